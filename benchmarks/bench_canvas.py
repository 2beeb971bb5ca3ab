"""Canvas control on the bundled demo checkpoint (its canvases settle; random weights never do), fp32 on CPU.

* Early streaming: time to first token, end-to-end time and denoising steps per reply with and without
  `stream_prefix`, and how many output tokens agree with the same seed without it.
* Warm start and infill: steps and seconds per canvas for a cold start, for a warm start from the cold reply's own
  tokens (edit in place: a canvas that is already the answer), for a warm start from the reply with a span of it
  renoised, and for an infill whose suffix is the cold reply's tail.

    python -m benchmarks.bench_canvas            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, CanvasInit, Finished, Request, SamplingParams
from models.hub import DEMO_CHECKPOINT

QUESTIONS = ["Tell me about list displays.", "How does the while loop work?", "What is the try statement?",
             "Explain the import statement."]  # fmt: skip


def run(engine: Engine, ids: list[int], params: SamplingParams, canvas: CanvasInit | None = None) -> dict:
    """One request alone: its tokens, time to first token, total seconds and denoising steps."""
    engine.add_request(Request("r", tuple(ids), params, canvas_init=canvas))
    start, first, tokens, steps = time.perf_counter(), None, [], 0
    while engine.has_unfinished():
        for event in engine.step()[0]:
            if isinstance(event, BlockCommitted):
                first = first or time.perf_counter() - start
                tokens += event.token_ids
            elif isinstance(event, Finished):
                steps = event.usage.num_denoise_steps
    return {"tokens": tokens, "ttft": first or 0.0, "seconds": time.perf_counter() - start, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_CHECKPOINT)
    engine = Engine(EngineConfig(str(DEMO_CHECKPOINT), device="cpu", dtype="float32", kv_budget_bytes=64 * 2**20))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    run(engine, prompts[0], SamplingParams(seed=0))  # warm-up

    print("early streaming (stream_prefix), per reply: time to first token / total / steps, off -> on")
    rows = []
    for q, ids in zip(QUESTIONS, prompts, strict=True):
        for seed in range(args.seeds):
            off = run(engine, ids, SamplingParams(seed=seed))
            on = run(engine, ids, SamplingParams(seed=seed, stream_prefix=True))
            same = sum(a == b for a, b in zip(off["tokens"], on["tokens"], strict=False))
            agree = same / max(len(off["tokens"]), len(on["tokens"]), 1)
            rows.append((off, on, agree))
            print(f"  {q[:30]:30s} seed {seed}: ttft {off['ttft']:.3f} -> {on['ttft']:.3f} s, total "
                  f"{off['seconds']:.3f} -> {on['seconds']:.3f} s, steps {off['steps']} -> {on['steps']}, "
                  f"tokens agree {agree:.0%}")  # fmt: skip
    ttft_off = statistics.median(r[0]["ttft"] for r in rows)
    ttft_on = statistics.median(r[1]["ttft"] for r in rows)
    print(f"median time to first token: {ttft_off:.3f} s off, {ttft_on:.3f} s on ({ttft_off / ttft_on:.1f}x sooner); "
          f"median total {statistics.median(r[0]['seconds'] for r in rows):.3f} s -> "
          f"{statistics.median(r[1]['seconds'] for r in rows):.3f} s; tokens agreeing "
          f"{statistics.mean(r[2] for r in rows):.1%} on average")  # fmt: skip

    print("\nwarm start and infill, per canvas: steps and seconds (mean over questions x seeds)")
    costs: dict[str, list[tuple[int, float]]] = {}
    for ids in prompts:
        for seed in range(args.seeds):
            cold = run(engine, ids, SamplingParams(seed=seed))
            reply = cold["tokens"]
            if len(reply) < 4:
                continue
            half = len(reply) // 2
            cases = {
                "cold start (noise)": (None, None),
                "warm start from its own reply": (CanvasInit(tuple(reply)), None),
                "warm, the reply's second half renoised": (CanvasInit(tuple(reply[:half])), None),
                "infill of the first half before the tail": (
                    CanvasInit((None,) * half + tuple(reply[half:]), ((half, len(reply)),)), half),
            }  # fmt: skip
            for name, (canvas, max_tokens) in cases.items():
                out = run(engine, ids, SamplingParams(seed=seed + 100, max_tokens=max_tokens), canvas)
                costs.setdefault(name, []).append((out["steps"], out["seconds"]))
    for name, values in costs.items():
        steps, seconds = statistics.mean(v[0] for v in values), statistics.mean(v[1] for v in values)
        print(f"  {name:42s} {steps:5.1f} steps, {seconds:.3f} s")


if __name__ == "__main__":
    main()
