"""Cost of logprobs (SamplingParams.logprobs; engine/sampler.py token_logprobs) on the demo or bench checkpoint.

Runs `--rows` seeded sequences with the same fixed step count three ways: without logprobs, with logprobs=0 (the
chosen token's only) and with logprobs=20 (the most alternatives) on every row. Logprobs are scored once per
committed block, at the step that commits it, so the report gives the scoring pass per committing step (ms, and its
share of a mean step) and the mean step of each run: what they cost spread over all steps.

    python -m benchmarks.bench_logprobs [--size demo|bench] [--rows 4] [--steps 16] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import step_times
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_runner import ModelRunner
from engine.request import Request, SamplingParams
from models.random_checkpoint import write_random_checkpoint

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
SCORING: list[float] = []  # seconds of each ModelRunner.logprobs call


def timed(method):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            SCORING.append(time.perf_counter() - t0)

    return wrapper


def run(engine: Engine, logprobs: int | None, args: argparse.Namespace) -> list[float]:
    """Step times (s) until every row is done."""
    prompt = list(range(200, 232))
    for i in range(args.rows):
        # Every canvas runs all its steps (no early stop): one committing step in `steps`.
        params = SamplingParams(max_tokens=args.max_tokens, steps=args.steps, confidence_threshold=1e-9,
                                stop_token_ids=(), seed=i, logprobs=logprobs)  # fmt: skip
        engine.add_request(Request(f"r{i}", tuple(prompt), params))
    return step_times(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", choices=["demo", "bench"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = DEMO if args.size == "demo" else write_random_checkpoint(tmp, "bench", seed=0)
        engine = Engine(EngineConfig(str(checkpoint), device=args.device, max_num_seqs=args.rows,
                                     kv_budget_bytes=2**30))  # fmt: skip
        print(f"{args.size}: vocab {engine.info.vocab_size}, canvas {engine.info.canvas_length}, {args.rows} rows, "
              f"{args.steps} steps per canvas, {args.max_tokens} tokens each, {args.device}")  # fmt: skip
        run(engine, 20, args)  # warm-up
        ModelRunner.logprobs = timed(ModelRunner.logprobs)
        steps: dict[int | None, list[float]] = {None: [], 0: [], 20: []}
        scoring: dict[int | None, list[float]] = {0: [], 20: []}
        for _ in range(2):  # interleaved, against drift on a shared machine
            for k in steps:
                SCORING.clear()
                steps[k] += run(engine, k, args)
                if k is not None:
                    scoring[k] += SCORING
    base = statistics.mean(steps[None])
    print(f"mean step without logprobs: {1e3 * base:.2f} ms")
    for k in (0, 20):
        step, per_commit = statistics.mean(steps[k]), statistics.mean(scoring[k])
        spread = sum(scoring[k]) / len(steps[k])
        print(f"logprobs={k:2d}: mean step {1e3 * step:.2f} ms ({100 * (step / base - 1):+.1f} % vs none); "
              f"scoring {1e3 * per_commit:.2f} ms per committing step ({100 * per_commit / base:.1f} % of a step), "
              f"{1e3 * spread:.3f} ms per step spread over all steps ({100 * spread / base:.2f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
