"""Logprobs of committed tokens on the tiny checkpoint: against a full log_softmax of the committing step's logits,
their shape (one per token, then the stop token; top-k sorted), batch invariance, and that asking for them changes
no token in fast or reference mode."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, InvalidRequestError, Request, SamplingParams
from models.hub import DEMO_CHECKPOINT
from server.text import Tokenizer

MiB = 2**20
STEPS = 6  # per canvas at most: enough to commit, and a few seconds per test


def prompt(seed: int) -> list[int]:
    return torch.randint(3, 2048, (12,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[BlockCommitted]]:
    events = engine.generate(requests)
    return {rid: [e for e in evs if isinstance(e, BlockCommitted)] for rid, evs in events.items()}


def demo_prompt() -> list[int]:
    """A real chat prompt for the demo checkpoint, whose replies are text."""
    tokenizer = Tokenizer(DEMO_CHECKPOINT)
    return tokenizer.chat_prompt_ids([{"role": "user", "content": "Tell me about the sea."}], False)


def tokens(blocks: list[BlockCommitted]) -> list[int]:
    return [t for b in blocks for t in b.token_ids]


def entries(blocks: list[BlockCommitted]):
    return [entry for b in blocks for entry in b.logprobs]


def scored_against_full_log_softmax(engine: Engine, ids: list[int], params: SamplingParams) -> list[BlockCommitted]:
    """Run one request step by step, checking each entry against log_softmax over the whole vocabulary of the
    softcapped logits the model gave that position at the step that committed it (the runner's hidden states then,
    read back before the next step); returns the request's blocks."""
    steps = []  # each step's hidden states [rows, C, H], recorded by wrapping the runner's forward
    forward = engine.runner.forward

    def recording(seqs, inputs):
        out, hidden = forward(seqs, inputs)
        steps.append(hidden.clone())
        return out, hidden

    engine.runner.forward = recording  # the instance's, until the end of this run
    try:
        engine.add_request(Request("full", tuple(ids), params))
        seq, blocks = engine.scheduler.waiting[0], []
        while engine.has_unfinished():
            slot, start = seq.slot, seq.streamed  # where this step's block starts in the canvas
            for event in engine.step()[0]:
                if not isinstance(event, BlockCommitted):
                    continue
                blocks.append(event)
                full = torch.log_softmax(engine.model.logits(steps[-1][slot]).float(), -1)  # [C, V]
                scored = [*event.token_ids, *([] if event.stop_token_id is None else [event.stop_token_id])]
                assert [e.token_id for e in event.logprobs] == scored
                for i, entry in enumerate(event.logprobs):
                    position = full[start + i]
                    assert entry.logprob == pytest.approx(position[entry.token_id].item(), abs=1e-5)
                    values, top = torch.topk(position, params.logprobs)
                    assert [t for t, _ in entry.top] == top.tolist()
                    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    finally:
        del engine.runner.forward
    return blocks


def test_logprobs_equal_a_full_log_softmax_of_the_committing_step(engine):
    params = SamplingParams(max_tokens=40, steps=STEPS, seed=3, logprobs=5)
    assert len(tokens(scored_against_full_log_softmax(engine, prompt(0), params))) == 40


def test_settled_prefixes_are_scored_at_the_step_that_settled_them():
    """The demo checkpoint's canvases settle (the tiny random one's never do): partial blocks start mid-canvas."""
    engine = Engine(EngineConfig(str(DEMO_CHECKPOINT), kv_budget_bytes=64 * MiB, max_num_seqs=1))
    params = SamplingParams(max_tokens=64, steps=8, seed=1, logprobs=2, stream_prefix=True)
    blocks = scored_against_full_log_softmax(engine, demo_prompt(), params)
    assert blocks[0].partial and not blocks[1].partial  # the canvas's final block starts where the prefix ended


def test_entries_one_per_token_then_the_stop_token(engine):
    plain = run(engine, {"a": (prompt(1), SamplingParams(max_tokens=24, steps=STEPS, seed=5, logprobs=3))})["a"]
    out = tokens(plain)
    assert len(entries(plain)) == len(out) == 24
    for entry in entries(plain):
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        top = [v for _, v in entry.top]
        assert len(top) == 3 and top == sorted(top, reverse=True) and all(v <= 0 for v in top)
        assert entry.logprob <= top[0] + 1e-5  # the committed argmax is the most likely id, up to rounding
    # The same canvas cut at a stop token: its entry comes last, at the position it held.
    stop = out[7]
    cut = out.index(stop)
    params = SamplingParams(max_tokens=24, steps=STEPS, seed=5, logprobs=3, stop_token_ids=(stop,))
    events = engine.generate({"b": (prompt(1), params)})["b"]
    blocks = [e for e in events if isinstance(e, BlockCommitted)]
    assert tokens(blocks) == out[:cut] and blocks[-1].stop_token_id == stop
    assert entries(blocks) == entries(plain)[: cut + 1]
    assert events[-1].usage.completion_tokens == len(entries(blocks))


def test_logprobs_change_no_token_and_are_batch_invariant(engine):
    alone = run(engine, {"x": (prompt(2), SamplingParams(max_tokens=30, steps=STEPS, seed=9, logprobs=2))})["x"]
    without = run(engine, {"x": (prompt(2), SamplingParams(max_tokens=30, steps=STEPS, seed=9))})["x"]
    assert tokens(alone) == tokens(without) and all(b.logprobs is None for b in without)
    batch = run(
        engine,
        {
            "x": (prompt(2), SamplingParams(max_tokens=30, steps=STEPS, seed=9, logprobs=2)),
            "y": (prompt(3), SamplingParams(max_tokens=20, steps=STEPS, seed=1, logprobs=20)),
            "z": (prompt(4), SamplingParams(max_tokens=20, steps=STEPS, seed=2)),
        },
    )
    assert tokens(batch["x"]) == tokens(alone)
    assert entries(batch["x"]) == entries(alone)
    assert all(len(e.top) == 20 for e in entries(batch["y"]))


def test_reference_mode_tokens_do_not_change(tiny_checkpoint):
    engine = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, reference_mode=True, max_num_seqs=1))
    runs = [
        run(engine, {"r": (prompt(5), SamplingParams(max_tokens=20, steps=STEPS, seed=4, logprobs=k))})["r"]
        for k in (None, 4)
    ]
    assert tokens(runs[0]) == tokens(runs[1]) and len(entries(runs[1])) == 20


@pytest.mark.parametrize("k", [-1, 21])
def test_logprobs_out_of_range_are_refused(engine, k):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        engine.add_request(Request("bad", tuple(prompt(0)), SamplingParams(logprobs=k)))
