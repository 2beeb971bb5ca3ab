"""Load benchmark: N concurrent streaming clients against `dgserve serve` on loopback.

Reports aggregate output tokens/s, time to first block and end-to-end latency percentiles, and errors. Starts its
own server on the random-weight demo checkpoint unless --url points at a running one. Every request loop is bounded.

    python -m benchmarks.bench_server --clients 8 --requests 32 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Result:
    ttfb: float  # seconds to the first chunk with text: the first committed block
    e2e: float
    tokens: int
    error: str | None = None


async def one_request(http: httpx.AsyncClient, body: dict) -> Result:
    started, first, tokens = time.perf_counter(), None, 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Result(0, 0, 0, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return Result(0, 0, 0, chunk["error"]["message"])
                if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Result(0, 0, 0, type(exc).__name__)
    return Result(first or 0.0, time.perf_counter() - started, tokens)


async def run_load(url: str, clients: int, requests: int, body: dict, timeout: float) -> tuple[list[Result], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[Result] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_request(http, {**body, "seed": i, "prompt": f"Request {i}: tell a story."}))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"p50 {q[49]:.2f} s  p90 {q[89]:.2f} s  p99 {q[98]:.2f} s  max {max(values):.2f} s"


def start_server(model: str, port: int, max_num_seqs: int, log: Path, *flags: str) -> subprocess.Popen:
    """`dgserve serve` on loopback, once ready; `flags` are further serve options."""
    command = [sys.executable, "-m", "server", "serve", "--model", model, "--port", str(port),
               "--max-num-seqs", str(max_num_seqs), "--served-model-name", "bench", *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server not ready in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server; default: start one on --model")
    parser.add_argument("--model", default="random-demo")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps per canvas (default: checkpoint)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        log = Path(tempfile.mkdtemp()) / "server.log"
        process = start_server(args.model, args.port, args.clients, log)
        url = f"http://127.0.0.1:{args.port}"
    body = {"model": "bench", "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if args.steps:
        body["diffusion"] = {"steps": args.steps}
    if args.url:
        body.pop("model")  # any served name
    try:
        results, seconds = asyncio.run(run_load(url, args.clients, args.requests, body, args.timeout))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    tokens = sum(r.tokens for r in ok)
    print(f"{len(results)} requests, {args.clients} concurrent clients, {args.max_tokens} tokens each, {seconds:.1f} s")
    print(f"throughput          {tokens / seconds:8.1f} output tokens/s  ({len(ok) / seconds:.2f} requests/s)")
    print(f"time to first block {percentiles([r.ttfb for r in ok])}")
    print(f"end-to-end latency  {percentiles([r.e2e for r in ok])}")
    print(f"errors              {len(errors)}" + (f"  e.g. {errors[0]}" if errors else ""))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
