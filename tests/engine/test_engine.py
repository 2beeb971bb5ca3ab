"""The real engine on the tiny checkpoint: token parity with transformers' generate() in reference mode, seeded
batch invariance, max_tokens and stop tokens, continuous batching, abort, admission."""

from __future__ import annotations

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, Draft, Finished, FinishReason, QueueFullError, Request, SamplingParams
from engine.sequence import Sequence

MiB = 2**20


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 2048, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def output_tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, BlockCommitted) for t in e.token_ids]


def assert_same_tokens(ours: list[int], expected: list[int], label: str) -> None:
    if ours != expected:
        first = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b), None)
        raise AssertionError(f"{label}: first difference at {first}\n ours:     {ours}\n expected: {expected}")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def reference_engine(tiny_checkpoint):
    return Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, reference_mode=True, max_num_seqs=1))


def reference_generate(reference, ids: list[int], seed: int, **kwargs) -> list[int]:
    """transformers' output up to (not including) the first stop token, as dgserve reports it."""
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = reference.generate(torch.tensor([ids]), **kwargs).sequences[0, len(ids) :].tolist()
    stop = next((i for i, t in enumerate(sequences) if t in (1, 106, 50)), len(sequences))
    return sequences[:stop]


def run_one(engine: Engine, ids: list[int], params: SamplingParams) -> list:
    return engine.generate({"r": (ids, params)})["r"]


@pytest.mark.parametrize("length, seed", [(10, 0), (40, 1), (25, 2)], ids=["short", "past_window", "mid"])
def test_reference_mode_matches_generate_token_for_token(reference, reference_engine, length, seed):
    ids = prompt(length, seed)
    expected = reference_generate(reference, ids, seed, max_new_tokens=96, max_denoising_steps=8)
    events = run_one(reference_engine, ids, SamplingParams(max_tokens=96, steps=8, seed=seed))
    assert_same_tokens(output_tokens(events), expected, "reference mode vs generate")
    assert events[-1].usage.num_canvases == 3 and events[-1].usage.num_denoise_steps == 24


def test_reference_mode_matches_generate_with_adaptive_stopping(reference, reference_engine):
    """stability 0 and a confidence threshold just under ln V make canvases stop at different steps (spec 9.3)."""
    ids, knobs = prompt(20, 5), dict(stability_threshold=0, confidence_threshold=7.6044)
    expected = reference_generate(reference, ids, 5, max_new_tokens=96, max_denoising_steps=8, **knobs)
    events = run_one(reference_engine, ids, SamplingParams(max_tokens=96, steps=8, seed=5, **knobs))
    assert_same_tokens(output_tokens(events), expected, "adaptive stopping")
    assert events[-1].usage.num_denoise_steps < 24  # some canvas stopped early


def test_reference_mode_matches_generate_when_a_canvas_holds_a_stop_token(reference, reference_engine):
    """Find a seed whose reference output stops inside a canvas, then require the same tokens and reason."""
    for seed in range(40):
        ids = prompt(12, 100 + seed)
        expected = reference_generate(reference, ids, seed, max_new_tokens=128, max_denoising_steps=4)
        if len(expected) < 128:
            break
    else:
        pytest.fail("no seed in range produced a stop token")
    events = run_one(reference_engine, ids, SamplingParams(max_tokens=128, steps=4, seed=seed))
    assert_same_tokens(output_tokens(events), expected, f"stop token, seed {seed}")
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].usage.completion_tokens == len(expected) + 1  # the stop token counts, is not streamed


def test_seeded_request_gives_the_same_tokens_alone_or_in_a_batch(engine):
    params = SamplingParams(max_tokens=80, steps=6, seed=1234)
    ids = prompt(23, 7)
    alone = output_tokens(run_one(engine, ids, params))
    # Same request beside others of other lengths, joining at different iterations.
    engine.add_request(Request("a", tuple(prompt(5, 8)), SamplingParams(max_tokens=64, steps=5, seed=1)))
    engine.add_request(Request("b", tuple(prompt(40, 9)), SamplingParams(max_tokens=32, steps=7)))
    events = {"a": [], "b": [], "x": [], "c": []}
    for i in range(200):
        if i == 3:
            engine.add_request(Request("x", tuple(ids), params))
        if i == 5:
            engine.add_request(Request("c", tuple(prompt(17, 10)), SamplingParams(max_tokens=96, temperature=0.5)))
        for event in engine.step()[0]:
            events[event.request_id].append(event)
        if not engine.has_unfinished():
            break
    assert_same_tokens(output_tokens(events["x"]), alone, "batched vs alone")
    other_seed = output_tokens(run_one(engine, ids, SamplingParams(max_tokens=80, steps=6, seed=99)))
    assert other_seed != alone


def test_temperature_zero_is_deterministic(engine):
    params = SamplingParams(max_tokens=40, steps=4, temperature=0, stop_token_ids=())
    first, second = (output_tokens(run_one(engine, prompt(9, 3), params)) for _ in range(2))
    assert first == second and len(first) == 40


def test_max_tokens_is_exact_and_reports_length(engine):
    events = run_one(engine, prompt(9, 4), SamplingParams(max_tokens=45, steps=3, stop_token_ids=()))
    assert len(output_tokens(events)) == 45
    assert [len(e.token_ids) for e in events if isinstance(e, BlockCommitted)] == [32, 13]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason is FinishReason.LENGTH
    assert finished.usage.completion_tokens == 45 and finished.usage.num_canvases == 2


def test_stop_token_drops_the_rest_of_the_canvas(engine):
    ids, base = prompt(9, 4), dict(max_tokens=96, steps=3, seed=5)
    free_run = output_tokens(run_one(engine, ids, SamplingParams(stop_token_ids=(), **base)))
    stop_id = free_run[40]  # a token of the second canvas
    first = free_run.index(stop_id)
    events = run_one(engine, ids, SamplingParams(stop_token_ids=(stop_id,), **base))
    assert output_tokens(events) == free_run[:first]
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].usage.num_canvases == first // 32 + 1


def test_drafts_only_for_requests_that_ask(engine):
    events = run_one(engine, prompt(6, 1), SamplingParams(max_tokens=32, steps=3, stream_drafts=True))
    drafts = [e for e in events if isinstance(e, Draft)]
    assert [d.step for d in drafts] == [1, 2, 3] and drafts[-1].token_ids == output_tokens(events)
    quiet = run_one(engine, prompt(6, 1), SamplingParams(max_tokens=32, steps=3))
    assert not any(isinstance(e, Draft) for e in quiet)


def test_abort_frees_the_slot_and_memory_before_the_next_iteration(engine):
    engine.add_request(Request("long", tuple(prompt(30, 2)), SamplingParams(max_tokens=320, steps=48)))
    engine.step()
    assert engine.scheduler.budget.num_used > 0 and len(engine.scheduler.running) == 1
    engine.abort("long")
    assert engine.scheduler.budget.num_used == 0 and not engine.scheduler.running
    events, stats = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [("long", FinishReason.ABORT)]
    assert stats.num_running == 0 and stats.kv_pages_used == 0 and not engine.has_unfinished()


def test_admission_waits_for_memory_and_refuses_what_can_never_fit(tiny_checkpoint):
    # At fp32 two slots' sliding windows take 2 x 24,064 bytes and a page (32 tokens) 16,384: four pages. One tiny
    # sequence of 10 + 2 x 32 slots needs three of them, so the budget holds one.
    small = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=2 * 24_064 + 4 * 16_384, max_num_seqs=2,
                                max_waiting=0))  # fmt: skip
    params = SamplingParams(max_tokens=64, steps=2)
    small.add_request(Request("first", tuple(prompt(10, 1)), params))
    small.add_request(Request("second", tuple(prompt(10, 2)), params))
    with pytest.raises(QueueFullError):
        small.add_request(Request("third", tuple(prompt(10, 3)), params))
    _, stats = small.step()
    assert stats.num_running == 1 and stats.num_waiting == 1  # two slots, but the budget holds one sequence
    with pytest.raises(ValueError, match="more than the whole budget"):
        small.add_request(Request("huge", tuple(prompt(10, 4)), SamplingParams(max_tokens=3000)))
    while small.has_unfinished():
        small.step()
    assert small.scheduler.budget.num_used == 0


def test_a_budget_too_small_for_the_sliding_windows_fails_at_start(tiny_checkpoint):
    with pytest.raises(ValueError, match="cannot hold the sliding windows of 2 sequences"):
        Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=2 * 24_064, max_num_seqs=2))


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        (SamplingParams(steps=0), "steps must be >= 1 and <= 1024, got 0"),  # not the default 48
        (SamplingParams(stability_threshold=-1), "stability_threshold must be >= 0"),
        (SamplingParams(max_tokens=5000), "maximum context length is 4096 tokens"),
        (SamplingParams(entropy_bound=0), "entropy_bound must be > 0"),
        (SamplingParams(t_min=0.9, t_max=0.5), "t_min <= t_max"),
        (SamplingParams(temperature=-1), "temperature must be in"),
        (SamplingParams(seed=-3), "seed must be in"),
        (SamplingParams(confidence_threshold=0), "confidence_threshold must be > 0"),
    ],
)
def test_invalid_parameters_are_clear_errors(engine, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(Request("bad", tuple(prompt(5, 1)), params))


def test_invalid_prompts_are_clear_errors(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("bad", tuple([]), SamplingParams()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(Request("bad", tuple([5, 2048]), SamplingParams()))


def test_a_sequence_computes_bit_identical_numbers_alone_or_in_any_batch(engine):
    """Stronger than equal tokens: every step's argmax canvas and the final canvas state match to the bit across
    random batch mixes, in buckets of 1, 2 and 4 slots and whatever slot the sequence lands in.

    Fails without the token and expert-group alignment (CPU GEMMs round small row counts differently).
    """
    params = SamplingParams(max_tokens=32, steps=3, stability_threshold=4, seed=7, stream_drafts=True)

    def run(companions: list[list[int]], first: bool) -> tuple[list, torch.Tensor]:
        target = prompt(13, 99)
        requests = {f"c{i}": (p, SamplingParams(max_tokens=64, seed=i)) for i, p in enumerate(companions)}
        requests = {"x": (target, params), **requests} if first else {**requests, "x": (target, params)}
        for request_id, (ids, p) in requests.items():
            engine.add_request(Request(request_id, tuple(ids), p))
        drafts, soft = [], None
        while any(s.request_id == "x" for s in (*engine.scheduler.waiting, *engine.scheduler.running)):
            x = next(s for s in (*engine.scheduler.waiting, *engine.scheduler.running) if s.request_id == "x")
            events, _ = engine.step()
            drafts += [e.token_ids for e in events if isinstance(e, Draft) and e.request_id == "x"]
            if x.canvas_steps == 2:  # mid-canvas: the SC input the next step reads
                soft = engine.runner.canvases.soft[x.slot].clone()
        for request_id in requests:
            engine.abort(request_id)
        engine.step()
        return drafts, soft

    alone = run([], True)
    assert len(alone[0]) == 3
    for trial in range(6):
        gen = torch.Generator().manual_seed(trial)
        companions = [
            prompt(int(n), 50 + trial * 4 + i) for i, n in enumerate(torch.randint(1, 40, (trial % 4,), generator=gen))
        ]
        drafts, soft = run(companions, first=trial % 2 == 0)
        assert drafts == alone[0], f"trial {trial}"
        assert torch.equal(soft, alone[1]), f"trial {trial}"


def cached(engine: Engine, seq: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A sequence's cached keys and values per layer [kv, n, d] in position order (sliding layers: the last W-1)."""
    pool, table = engine.runner.pool, torch.tensor([seq.pages])
    out = []
    for layer, g in enumerate(engine.model_config.layers):
        if g.is_sliding:
            out.append(tuple(t.clone() for t in pool.held_sliding(layer, seq.slot, seq.length)))
        else:
            out.append(tuple(t[0, :, : seq.length].clone() for t in pool.full_keys(layer, table)))
    return out


@pytest.fixture(scope="module")
def chunked_engine(tiny_checkpoint):
    return Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, max_num_seqs=4, prefill_chunk=16))


def test_a_long_prompt_prefills_in_chunks_while_others_keep_denoising(engine, chunked_engine):
    slow = SamplingParams(max_tokens=32, steps=40, stability_threshold=41)  # no commit in the window
    chunked_engine.add_request(Request("running", tuple(prompt(10, 1)), slow))
    chunked_engine.step()
    chunked_engine.add_request(Request("long", tuple(prompt(40, 2)), SamplingParams(max_tokens=32, seed=3)))
    stats = [chunked_engine.step()[1] for _ in range(3)]
    assert [(s.num_encode_tokens, s.num_denoise_rows) for s in stats] == [(16, 1), (16, 1), (8, 2)]
    long = next(s for s in chunked_engine.scheduler.running if s.request_id == "long")
    # The chunked cache equals a one-pass prefill up to rounding (attention reductions run over other lengths).
    engine.add_request(Request("whole", tuple(prompt(40, 2)), SamplingParams(max_tokens=32, seed=3)))
    engine.step()
    whole = next(s for s in engine.scheduler.running if s.request_id == "whole")
    for (chunk_k, chunk_v), (whole_k, whole_v) in zip(cached(chunked_engine, long), cached(engine, whole), strict=True):
        torch.testing.assert_close(chunk_k, whole_k)
        torch.testing.assert_close(chunk_v, whole_v)
    engine.abort("whole")
    engine.step()
    chunked_engine.abort("running")
    chunked_engine.abort("long")
    chunked_engine.step()


def test_chunked_prefill_keeps_a_sequence_bit_identical_alone_or_in_a_batch(chunked_engine):
    """A sequence's chunks start at fixed offsets of its own prompt, whatever else is being encoded."""

    def prefilled_keys(requests: dict[str, tuple[list[int], SamplingParams]]) -> list[torch.Tensor]:
        for request_id, (ids, params) in requests.items():
            chunked_engine.add_request(Request(request_id, tuple(ids), params))
        x = next(s for s in chunked_engine.scheduler.waiting if s.request_id == "x")
        while x.slot < 0 or x.to_encode:
            chunked_engine.step()
        keys = [t for kv in cached(chunked_engine, x) for t in kv]
        for request_id in requests:
            chunked_engine.abort(request_id)
        chunked_engine.step()
        return keys

    x = (prompt(37, 5), SamplingParams(max_tokens=64, seed=21))
    alone = prefilled_keys({"x": x})
    others = {"a": (prompt(29, 6), SamplingParams(max_tokens=96)), "b": (prompt(51, 7), SamplingParams(max_tokens=32))}
    for batch in ({**others, "x": x}, {"a": others["a"], "x": x}):
        for ours, expected in zip(prefilled_keys(batch), alone, strict=True):
            assert torch.equal(ours, expected)


def test_an_iteration_encodes_at_most_max_num_batched_tokens_in_whole_chunks(tiny_checkpoint):
    """A chunk that does not fit the bound waits whole (its offsets stay fixed); earlier arrivals go first."""
    bounded = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, max_num_seqs=4, prefill_chunk=16,
                                  max_num_batched_tokens=32))  # fmt: skip
    slow = SamplingParams(max_tokens=32, steps=40, stability_threshold=41)  # no commit in the window
    for i, name in enumerate("abc"):
        bounded.add_request(Request(name, tuple(prompt(40, i)), slow))
    stats = [bounded.step()[1] for _ in range(5)]
    assert [(s.num_encode_tokens, s.num_denoise_rows) for s in stats] == [(32, 0), (32, 0), (32, 2), (16, 2), (8, 3)]
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= prefill_chunk"):
        EngineConfig(str(tiny_checkpoint), prefill_chunk=4096, max_num_batched_tokens=2048)


def test_reference_mode_prefills_in_one_pass_as_generate_does(tiny_checkpoint):
    ref = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, reference_mode=True, max_num_seqs=1,
                              prefill_chunk=8))  # fmt: skip
    ref.add_request(Request("r", tuple(prompt(40, 4)), SamplingParams(max_tokens=32, steps=2)))
    assert ref.step()[1].num_encode_tokens == 40
