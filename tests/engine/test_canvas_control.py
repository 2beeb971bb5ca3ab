"""Canvas control: a first canvas started from given ids (warm start, edit in place), pinned spans that hold for the
whole canvas (infill), and streaming the settled prefix of a canvas before it commits (stream_prefix)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import (
    BlockCommitted,
    CanvasInit,
    Draft,
    Finished,
    FinishReason,
    InvalidRequestError,
    Request,
    SamplingParams,
)
from tests.engine.test_engine import (  # noqa: F401 (module fixtures)
    MiB,
    assert_same_tokens,
    output_tokens,
    prompt,
    reference,
    reference_engine,
    reference_generate,
)

C = 32  # the tiny checkpoint's canvas (models/random_checkpoint.py SIZES["tiny"])


def run(engine: Engine, requests: dict, join_at: dict[str, int] | None = None, watch=None) -> dict[str, list]:
    """Run requests {id: (prompt, params, canvas)} to completion, adding each at its iteration in `join_at` (default
    0); returns each request's events in order. `watch(engine)` runs after every iteration."""
    join_at = join_at or {}
    events: dict[str, list] = {request_id: [] for request_id in requests}
    pending = dict(requests)
    for i in range(1000):
        for request_id in [r for r in pending if join_at.get(r, 0) <= i]:
            ids, params, canvas = pending.pop(request_id)
            engine.add_request(Request(request_id, tuple(ids), params, canvas_init=canvas))
        for event in engine.step()[0]:
            events[event.request_id].append(event)
        if watch is not None:
            watch(engine)
        if not pending and not engine.has_unfinished():
            return events
    raise AssertionError("requests did not finish")


def canvases(events: list) -> list[list]:
    """The events split per canvas: each canvas's events end with its final (not partial) block or the finish."""
    out, current = [], []
    for event in events:
        current.append(event)
        if isinstance(event, Finished) or (isinstance(event, BlockCommitted) and not event.partial):
            out.append(current)
            current = []
    return [c for c in out if any(isinstance(e, Draft) for e in c)]


def test_reference_mode_warm_start_matches_generate_with_decoder_input_ids(reference, reference_engine):  # noqa: F811
    """The given ids replace the first canvas's noise after it is drawn, as generate() does with decoder_input_ids;
    the second canvas starts from noise."""
    for seed in (3, 4):
        ids, warm = prompt(14, 30 + seed), prompt(C, 40 + seed)
        knobs = dict(max_new_tokens=64, max_denoising_steps=4)
        expected = reference_generate(reference, ids, seed, decoder_input_ids=torch.tensor([warm]), **knobs)
        assert len(expected) > C  # two canvases
        if seed == 3:  # the warm start shows: ignoring it would give other tokens
            assert expected[:C] != reference_generate(reference, ids, seed, max_new_tokens=C, max_denoising_steps=4)
        params = SamplingParams(max_tokens=64, steps=4, seed=seed)
        events = run(reference_engine, {"r": (ids, params, CanvasInit(ids=tuple(warm)))})["r"]
        assert_same_tokens(output_tokens(events), expected, f"warm start, seed {seed}")
        assert events[-1].usage.num_canvases == 2 and events[-1].usage.num_denoise_steps == 8


PINNED = ((0, 4), (10, 12))


def pinned_request() -> tuple[list[int], SamplingParams, CanvasInit]:
    """A warm start of 12 ids, two spans of them pinned, and two canvases of output."""
    canvas = CanvasInit(ids=tuple(prompt(12, 77)), pinned=PINNED)
    params = SamplingParams(max_tokens=64, steps=4, stop_token_ids=(), seed=11, stream_drafts=True)
    return prompt(9, 76), params, canvas


def unpinned_requests() -> dict:
    return {
        "a": (prompt(13, 78), SamplingParams(max_tokens=64, steps=4, seed=12), None),
        "b": (prompt(5, 79), SamplingParams(max_tokens=32, steps=3, seed=13, stream_drafts=True), None),
    }


def test_pinned_spans_hold_and_the_batch_does_not_matter(engine):
    ids, params, canvas = pinned_request()
    given = {i: canvas.ids[i] for start, end in PINNED for i in range(start, end)}
    alone = run(engine, {"p": (ids, params, canvas)})["p"]
    first, second = canvases(alone)
    drafts = [e for e in first if isinstance(e, Draft)]
    assert [d.step for d in drafts] == [1, 2, 3, 4]
    for draft in drafts:
        assert {i: draft.token_ids[i] for i in given} == given, f"step {draft.step}"
        assert draft.pinned == PINNED  # no settled prefix beyond the given (0, 4): stream_prefix is off
    tokens = output_tokens(alone)
    assert len(tokens) == 64 and {i: tokens[i] for i in given} == given
    assert tokens[:C] == drafts[-1].token_ids  # the committed canvas is the last argmax, pins included
    # The second canvas starts from noise: nothing is pinned there.
    assert all(e.pinned == () for e in second if isinstance(e, Draft))
    # Unpinned positions are denoised as usual: the warm start's free ids do not all survive.
    assert tokens[4:10] != list(canvas.ids[4:10])

    others_alone = run(engine, unpinned_requests())
    for join_at in ({"p": 0}, {"p": 2}):
        batched = run(engine, {**unpinned_requests(), "p": (ids, params, canvas)}, join_at)
        assert_same_tokens(output_tokens(batched["p"]), tokens, f"pinned request batched, {join_at}")
        assert [e.token_ids for e in batched["p"] if isinstance(e, Draft)] == [
            e.token_ids for e in alone if isinstance(e, Draft)
        ]
        for request_id in ("a", "b"):
            assert_same_tokens(
                output_tokens(batched[request_id]), output_tokens(others_alone[request_id]), f"{request_id} beside p"
            )
            assert all(e.pinned == () for e in batched[request_id] if isinstance(e, Draft))


def test_infill_fills_the_gap_before_a_pinned_suffix(engine):
    m, suffix = 10, tuple(prompt(6, 81))
    end = m + len(suffix)
    canvas = CanvasInit(ids=(None,) * m + suffix, pinned=((m, end),))
    params = SamplingParams(max_tokens=m, steps=5, seed=21, stream_drafts=True)
    states: list[tuple[list[int], list[int]]] = []

    def watch(engine: Engine) -> None:  # the suffix as the next input and as the argmax, after every step
        seq = next((s for s in engine.scheduler.running if s.request_id == "i"), None)
        if seq is not None and seq.canvas_steps:
            state = engine.runner.canvases
            states.append((state.canvas[seq.slot, m:end].tolist(), state.argmax[seq.slot, m:end].tolist()))

    events = run(engine, {"i": (prompt(8, 80), params, canvas)}, watch=watch)["i"]
    tokens, drafts = output_tokens(events), [e for e in events if isinstance(e, Draft)]
    assert 0 < len(tokens) <= m and events[-1].usage.num_canvases == 1
    # Drafts show the middle and, past the output's end, the pinned suffix.
    assert drafts and all(d.token_ids[m:] == list(suffix) and d.pinned == ((m, end),) for d in drafts)
    assert len(states) == len(drafts) - 1  # the committing step leaves the running set
    assert states and all(state == (list(suffix), list(suffix)) for state in states)


QUESTIONS = {0: "How does the while loop work?", 1: "What is the try statement?"}  # seed: question


@pytest.fixture(scope="module")
def demo():
    """An engine on the bundled demo checkpoint (trained: its canvases settle) and its chat-templated prompts."""
    from transformers import AutoTokenizer

    from models.hub import DEMO_CHECKPOINT

    engine = Engine(EngineConfig(str(DEMO_CHECKPOINT), device="cpu", dtype="float32", kv_budget_bytes=64 * MiB,
                                 max_num_seqs=2))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(DEMO_CHECKPOINT)
    prompts = {}
    for seed, question in QUESTIONS.items():
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True)  # fmt: skip
        prompts[seed] = list(ids if isinstance(ids, list) else ids["input_ids"])
    return engine, prompts


def run_timed(engine: Engine, ids: list[int], params: SamplingParams) -> list[tuple[int, object]]:
    """One request's events, each with the engine iteration (1, 2, ...) it came from."""
    engine.add_request(Request("r", tuple(ids), params))
    out, iteration = [], 0
    while engine.has_unfinished():
        iteration += 1
        out += [(iteration, e) for e in engine.step()[0]]
    return out


@pytest.fixture(scope="module")
def demo_runs(demo):
    """Each seed's reply with stream_prefix (and drafts) and without."""
    engine, prompts = demo
    return {
        (seed, stream_prefix): run_timed(engine, prompts[seed],
                                         SamplingParams(seed=seed, stream_prefix=stream_prefix, stream_drafts=True))
        for seed in QUESTIONS for stream_prefix in (True, False)
    }  # fmt: skip


def blocks(events: list[tuple[int, object]]) -> list[tuple[int, BlockCommitted]]:
    return [(i, e) for i, e in events if isinstance(e, BlockCommitted)]


@pytest.mark.parametrize("seed", sorted(QUESTIONS))
def test_stream_prefix_sends_the_settled_prefix_before_the_canvas_commits(demo, demo_runs, seed):
    engine, _ = demo
    events = demo_runs[seed, True]
    committed, finished = blocks(events), events[-1][1]
    assert isinstance(finished, Finished) and finished.usage.num_canvases == 1
    *partials, (final_at, final) = committed
    assert partials and all(b.partial for _, b in partials) and not final.partial
    assert all(at < final_at for at, _ in partials)  # streamed at earlier iterations than the canvas's commit
    # What the final state implies: the last argmax canvas cut at its first stop token.
    last_draft = [e for _, e in events if isinstance(e, Draft)][-1]
    stop_ids = set(engine.info.stop_token_ids)
    stop = next((i for i, t in enumerate(last_draft.token_ids) if t in stop_ids), len(last_draft.token_ids))
    tokens = output_tokens(e for _, e in events)
    assert tokens == last_draft.token_ids[:stop]
    assert finished.usage.completion_tokens == len(tokens) + (finished.finish_reason is FinishReason.STOP)
    # Nothing sent changes: each partial block is the final output at its offset, and every later draft shows it.
    offset = 0
    for at, block in partials:
        assert block.token_ids == tokens[offset : offset + len(block.token_ids)]
        assert block.num_denoise_steps == at  # one canvas: iteration n runs its step n
        offset += len(block.token_ids)
        later = [e for i, e in events if i >= at and isinstance(e, Draft)]
        assert later
        for draft in later:
            assert draft.token_ids[:offset] == tokens[:offset], f"draft {draft.step} changed a streamed token"
            assert draft.pinned and draft.pinned[0][0] == 0 and draft.pinned[0][1] >= offset
    # Without stream_prefix: one block per canvas, none partial.
    plain = blocks(demo_runs[seed, False])
    assert plain and not any(b.partial for _, b in plain)
    assert all(e.pinned == () for _, e in demo_runs[seed, False] if isinstance(e, Draft))


def test_a_canvas_commits_once_its_settled_prefix_holds_all_its_output_or_a_stop_token(demo, demo_runs):
    engine, prompts = demo
    seed, full = 1, demo_runs[1, True]
    tokens, partials = output_tokens(e for _, e in full), [(at, b) for at, b in blocks(full) if b.partial]
    final_at = blocks(full)[-1][0]
    settled = [(at, sum(len(b.token_ids) for _, b in partials[: k + 1])) for k, (at, _) in enumerate(partials)]

    # max_tokens reached inside the settled prefix: the canvas commits at that step, not when it would have stopped.
    limit = 8
    commit_at = next(at for at, n in settled if n >= limit)
    assert commit_at < final_at
    short = run_timed(engine, prompts[seed], SamplingParams(seed=seed, stream_prefix=True, max_tokens=limit))
    assert output_tokens(e for _, e in short) == tokens[:limit]
    assert short[-1][1].finish_reason is FinishReason.LENGTH and short[-1][1].usage.num_denoise_steps == commit_at

    # A stop token in the settled prefix: the canvas commits at once, cut before it.
    at, n = settled[0]
    assert n >= 2 and tokens[n - 1] not in tokens[: n - 1]
    stopped = run_timed(engine, prompts[seed], SamplingParams(seed=seed, stream_prefix=True,
                                                              stop_token_ids=(tokens[n - 1],)))  # fmt: skip
    assert output_tokens(e for _, e in stopped) == tokens[: n - 1]
    assert stopped[-1][1].finish_reason is FinishReason.STOP and stopped[-1][1].usage.num_denoise_steps == at


def test_an_abort_after_a_streamed_prefix_counts_the_tokens_sent(demo):
    engine, prompts = demo
    engine.add_request(Request("r", tuple(prompts[1]), SamplingParams(seed=1, stream_prefix=True)))
    sent: list[int] = []
    while not sent:
        sent += [t for e in engine.step()[0] if isinstance(e, BlockCommitted) and e.partial for t in e.token_ids]
    engine.abort("r")
    (finished,) = engine.step()[0]
    assert finished.finish_reason is FinishReason.ABORT and finished.usage.completion_tokens == len(sent)
    assert finished.usage.num_canvases == 0 and not engine.has_unfinished()


def streak_prefixes(drafts: list[Draft], settle_steps: int) -> list[int]:
    """Per step, the longest run of leading positions whose argmax has stayed the same for settle_steps steps: the
    settled prefix when every position's entropy is below settle_entropy (pinned positions never change)."""
    out, streak, previous = [], [], None
    for draft in drafts:
        tokens = draft.token_ids
        streak = [0] * len(tokens) if previous is None else [
            s + 1 if a == b else 0 for s, a, b in zip(streak, tokens, previous, strict=True)
        ]  # fmt: skip
        out.append(next((i for i, s in enumerate(streak) if s < settle_steps), len(tokens)))
        previous = tokens
    return out


def test_the_settled_prefix_follows_the_rule_and_holds_even_when_it_would_change(demo, demo_runs):
    """A loose rule (an entropy bound above ln V, one steady step) settles positions that would still change: they
    hold once pinned. The default rule's entropy bound settles less than steadiness alone would."""
    engine, prompts = demo
    loose = SamplingParams(seed=1, stream_prefix=True, stream_drafts=True, settle_steps=1, settle_entropy=100.0)
    events = run_timed(engine, prompts[1], loose)
    drafts = [e for _, e in events if isinstance(e, Draft)]
    prefixes = [d.pinned[0][1] if d.pinned else 0 for d in drafts]
    assert prefixes == streak_prefixes(drafts, 1) and prefixes[0] == 0 and max(prefixes[:-1]) > 4
    assert prefixes == sorted(prefixes)  # a pinned position stays pinned
    for k, draft in enumerate(drafts):
        for later in drafts[k + 1 :]:
            assert later.token_ids[: prefixes[k]] == draft.token_ids[: prefixes[k]], f"step {later.step}"
    streamed = 0  # each partial block is its step's draft from what was sent up to the settled prefix
    for at, block in blocks(events):
        if block.partial:
            assert block.token_ids == drafts[at - 1].token_ids[streamed : prefixes[at - 1]]
            streamed = prefixes[at - 1]
    assert output_tokens(e for _, e in events)[:streamed] == drafts[-1].token_ids[:streamed]

    default = [e for _, e in demo_runs[1, True] if isinstance(e, Draft)]  # settle_steps 3, settle_entropy 0.05
    prefixes, steady = [d.pinned[0][1] if d.pinned else 0 for d in default], streak_prefixes(default, 3)
    assert all(p <= s for p, s in zip(prefixes, steady, strict=True)) and prefixes != steady


def test_a_fully_pinned_canvas_commits_its_ids_once_stable(engine):
    """Pinned positions hold no entropy: a canvas pinned whole is confident and stable after S + 1 steps, whatever
    the model thinks of its ids. The next canvas is denoised from noise as usual."""
    given = tuple(prompt(C, 90))
    params = SamplingParams(max_tokens=C + 8, steps=6, stability_threshold=1, stop_token_ids=(), seed=3)
    events = run(engine, {"f": (prompt(7, 91), params, CanvasInit(ids=given, pinned=((0, C),)))})["f"]
    first, second = [e for e in events if isinstance(e, BlockCommitted)]
    assert first.token_ids == list(given) and first.num_denoise_steps == 2
    assert len(second.token_ids) == 8 and events[-1].usage.num_denoise_steps == 2 + 6
    # One position free: the confidence test is its entropy alone (near ln V on this random model), not its 32nd.
    params = SamplingParams(max_tokens=C, steps=6, stability_threshold=0, confidence_threshold=1.0,
                            stop_token_ids=(), seed=3)  # fmt: skip
    events = run(engine, {"f": (prompt(7, 91), params, CanvasInit(ids=given, pinned=((0, C - 1),)))})["f"]
    assert output_tokens(events)[: C - 1] == list(given[: C - 1]) and events[-1].usage.num_denoise_steps == 6


@pytest.mark.parametrize(
    "canvas, message",
    [
        (CanvasInit(ids=(5, 2048)), r"canvas token id 2048 is outside the vocabulary \[0, 2048\)"),
        (CanvasInit(ids=(None, -1)), r"canvas token id -1 is outside the vocabulary"),
        (CanvasInit(ids=(7,) * (C + 1)), f"the canvas is {C + 1} tokens; a canvas holds {C}"),
        (CanvasInit(ids=(7,) * 5, pinned=((3, 6),)), r"pinned span \[3, 6\) is not inside the given canvas of 5"),
        (CanvasInit(ids=(7,) * 5, pinned=((2, 2),)), r"pinned span \[2, 2\) is not inside"),
        (CanvasInit(ids=(7,) * 5, pinned=((-1, 2),)), r"pinned span \[-1, 2\) is not inside"),
        (CanvasInit(ids=(7,) * 6, pinned=((3, 5), (0, 4))), r"pinned span \[3, 5\) overlaps another pinned span"),
        (CanvasInit(ids=(7, None, 9), pinned=((0, 2),)), r"pinned span \[0, 2\) covers positions without a token"),
    ],
    ids=["id_past_vocab", "negative_id", "too_many_ids", "span_past_ids", "empty_span", "negative_start", "overlap",
         "span_over_noise"],
)  # fmt: skip
def test_invalid_canvas_inits_are_clear_errors(engine, canvas, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(Request("bad", tuple(prompt(5, 1)), SamplingParams(max_tokens=8), canvas_init=canvas))
    assert not engine.has_unfinished()  # refused: nothing queued


def test_adjacent_spans_and_a_full_canvas_are_valid(engine):
    for canvas in (CanvasInit(ids=(7,) * 6, pinned=((0, 3), (3, 6))), CanvasInit(ids=(7,) * C, pinned=((0, C),))):
        engine.add_request(Request("ok", tuple(prompt(5, 1)), SamplingParams(max_tokens=8), canvas_init=canvas))
        engine.abort("ok")
        engine.step()
    assert not engine.has_unfinished()
