"""Per-endpoint overhead: the same job (prompt ids, seed, max tokens, steps) through /v1/chat/completions,
/v1/completions (the chat prompt's token ids), /v1/responses and /v1/messages, collected and streamed, rounds
interleaved so that machine noise hits every endpoint alike. Prints the fastest and the median milliseconds per
request and their differences to chat (on a shared machine the fastest round is the least disturbed one); the
output token counts are printed too, to show that every endpoint ran the same job.

    python -m benchmarks.bench_endpoints --rounds 5   # starts a demo-checkpoint server, or --url a running one
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_server import start_server

PROMPT = "Tell me about list displays."


def bodies(http: httpx.Client, max_tokens: int, steps: int, seed: int) -> dict[str, tuple[str, dict]]:
    common = {"model": "bench", "seed": seed, "diffusion": {"steps": steps}}
    messages = [{"role": "user", "content": PROMPT}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    return {
        "chat": ("/v1/chat/completions", {**common, "messages": messages, "max_tokens": max_tokens}),
        "completions": ("/v1/completions", {**common, "prompt": ids, "max_tokens": max_tokens}),
        "responses": ("/v1/responses", {**common, "input": PROMPT, "max_output_tokens": max_tokens}),
        "messages": ("/v1/messages", {**common, "messages": messages, "max_tokens": max_tokens}),
    }


def output_tokens(body: dict) -> int:
    usage = body["usage"]
    return usage.get("completion_tokens", usage.get("output_tokens", 0))


def timed(http: httpx.Client, path: str, body: dict, stream: bool) -> tuple[float, int | None]:
    started = time.perf_counter()
    if not stream:
        response = http.post(path, json=body)
        response.raise_for_status()
        return time.perf_counter() - started, output_tokens(response.json())
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        response.raise_for_status()
        for _ in response.iter_lines():
            pass
    return time.perf_counter() - started, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (its model must be served as 'bench')")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    process = None
    if args.url is None:
        log = Path(tempfile.mkdtemp()) / "server.log"
        process = start_server(args.model, args.port, 1, log)
        args.url = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client(base_url=args.url, timeout=600) as http:
            jobs = bodies(http, args.max_tokens, args.steps, args.seed)
            for path, body in jobs.values():  # warm up every route once
                timed(http, path, body, stream=False)
            seconds: dict[tuple[str, bool], list[float]] = {(name, s): [] for name in jobs for s in (False, True)}
            tokens: dict[str, int | None] = {}
            for _ in range(args.rounds):
                for (name, stream), times in seconds.items():
                    elapsed, count = timed(http, *jobs[name], stream)
                    times.append(elapsed)
                    tokens[name] = count if count is not None else tokens.get(name)
        print(f"{args.rounds} rounds, max_tokens {args.max_tokens}, {args.steps} steps, seed {args.seed}, {args.model}")
        for label, stat in (("fastest", min), ("median", statistics.median)):
            print(f"{label + ' ms':<12} {'tokens':>6} {'collected':>10} {'vs chat':>8} {'streamed':>10} {'vs chat':>8}")
            base = {s: stat(seconds[("chat", s)]) for s in (False, True)}
            for name in jobs:
                row = [f"{name:<12} {tokens[name]:>6}"]
                for s in (False, True):
                    value = stat(seconds[(name, s)])
                    row.append(f"{value * 1e3:>10.1f} {(value - base[s]) * 1e3:>+8.1f}")
                print(" ".join(row))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
