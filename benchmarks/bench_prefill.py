"""Long-prompt prefill: one encoder pass over the whole prompt (as generate() does) against chunked prefill.

On the random-weight demo checkpoint (fp32 CPU, 2 threads), for each prompt length it times the iterations until the
prompt is in the KV cache and the first denoising step ran, and the memory growth over them, each measurement in a
fresh spawned process after a short warm-up, then prints the ratios one pass / chunked.

    python -m benchmarks.bench_prefill                          # 4K, 16K, 32K tokens; about 2 minutes
    python -m benchmarks.bench_prefill --lengths 8192 --chunks 1024 4096
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from benchmarks.bench_engine import MiB, reset_peak_rss, rss_bytes
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from models.hub import resolve_checkpoint


def run_prefill(length: int, chunk: int) -> tuple[float, float]:
    """Seconds and MiB of memory growth to prefill `length` tokens and run the first denoising step."""
    torch.set_num_threads(2)
    config = EngineConfig(
        str(resolve_checkpoint("random-demo")),
        dtype="float32",
        prefill_chunk=chunk,
        max_num_batched_tokens=max(chunk, 8192),
    )  # one pass: the whole prompt in one batch
    engine = Engine(config)
    params = SamplingParams(max_tokens=16, steps=1, seed=0)
    engine.generate({"warmup": ([5] * 64, params)})
    loaded = rss_bytes("VmRSS")
    reset_peak_rss()
    engine.add_request(Request("long", tuple([5 + i % 900 for i in range(length)]), params))
    start = time.perf_counter()
    while engine.step()[1].num_denoise_rows == 0:
        pass
    return time.perf_counter() - start, (rss_bytes("VmHWM") - loaded) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32000], help="prompt tokens")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048], help="prefill_chunk values to compare")
    args = parser.parse_args()
    print("random-demo checkpoint, fp32 CPU, 2 threads: prefill + first denoising step of one prompt")
    print(" tokens |    chunk | seconds | growth MiB | one pass / chunked: time  memory")
    for length in args.lengths:
        baseline = None
        for chunk in [length, *args.chunks]:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                seconds, growth = pool.submit(run_prefill, length, chunk).result()
            label = "one pass" if chunk == length else str(chunk)
            ratios = "" if baseline is None else f"{baseline[0] / seconds:24.1f}x {baseline[1] / growth:6.1f}x"
            print(f"{length:7d} | {label:>8} | {seconds:7.2f} | {growth:10.0f} |{ratios}", flush=True)
            baseline = baseline or (seconds, growth)


if __name__ == "__main__":
    main()
