"""Cost of constrained decoding (engine/constraint.py) on a random checkpoint.

Runs `--rows` seeded sequences with the same fixed step count twice: all unconstrained, then with the last row under
a JSON grammar (response_format json_object). Reports the constraint's host work per committed canvas (candidates:
the top-k LM-head pass; walk: the grammar walk), its share of the mean engine step, and the mean step time of both
runs: the slowdown the constrained row costs the unconstrained rows batched beside it.

    python -m benchmarks.bench_constraint [--size demo|bench] [--rows 4] [--steps 8] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from benchmarks import step_times
from engine.config import EngineConfig
from engine.constraint import Constraint
from engine.engine import Engine
from engine.model_runner import ModelRunner
from engine.request import Request, SamplingParams
from models.random_checkpoint import write_random_checkpoint
from server.structured import Grammars
from server.text import Tokenizer

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, method):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t0)

    return wrapper


def run(engine: Engine, grammars: Grammars | None, args: argparse.Namespace) -> list[float]:
    """Step times (s) until every row is done; the last row is constrained when `grammars` is given."""
    prompt = list(range(200, 232))
    for i in range(args.rows):
        constraint = None
        if grammars is not None and i == args.rows - 1:
            constraint = grammars.constraint(grammars.json_schema({"type": "object"}, "bench"), args.max_tokens)
        params = SamplingParams(max_tokens=args.max_tokens, steps=args.steps, stability_threshold=0,
                                stop_token_ids=(), seed=i)  # fmt: skip
        engine.add_request(Request(f"r{i}", tuple(prompt), params, constraint))
    return step_times(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", choices=["demo", "bench"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(tmp, args.size, seed=0)
        engine = Engine(EngineConfig(str(checkpoint), device=args.device, max_num_seqs=args.rows,
                                     kv_budget_bytes=2**30))  # fmt: skip
        t0 = time.perf_counter()
        grammars = Grammars(Tokenizer(checkpoint).hf, engine.info.vocab_size, engine.info.stop_token_ids)
        print(f"{args.size}: vocab {engine.info.vocab_size}, canvas {engine.info.canvas_length}, {args.rows} rows, "
              f"{args.steps} steps, llguidance tokenizer built in {time.perf_counter() - t0:.2f} s")  # fmt: skip
        run(engine, None, args)  # warm-up
        ModelRunner.candidates = timed("candidates", ModelRunner.candidates)
        Constraint.commit = timed("walk", Constraint.commit)
        plain, constrained = [], []
        for _ in range(2):  # interleaved, against drift on a shared machine
            plain += run(engine, None, args)
            constrained += run(engine, grammars, args)
    step = statistics.mean(plain)
    print(
        f"mean step: unconstrained {1e3 * step:.1f} ms, with one constrained row "
        f"{1e3 * statistics.mean(constrained):.1f} ms ({100 * (statistics.mean(constrained) / step - 1):+.1f} %)"
    )
    for name in ("candidates", "walk"):
        per_canvas = statistics.mean(TIMES[name])
        print(f"{name}: {1e3 * per_canvas:.2f} ms per constrained canvas ({len(TIMES[name])} canvases), "
              f"{100 * per_canvas / step:.1f} % of a step")  # fmt: skip


if __name__ == "__main__":
    main()
