"""The fleet's router on loopback: time to first token and throughput through vllm-router against the replica
directly, in the same run, and client errors when a replica is stopped under load, per routing policy.

Starts its own replicas (`dgserve serve`) and routers (the vllm-router on PATH, with docker-compose.fleet.yml's flags
from tools/fleet_compose.py); every request loop is bounded.

    python -m benchmarks.bench_router --clients 4 --requests 16 --max-tokens 64 --steps 8
    python -m benchmarks.bench_router --failover --policies cache_aware round_robin power_of_two
    python -m benchmarks.bench_router --failover --router-defaults   # without the fleet's settings, to compare
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_server import percentiles, run_load, start_server
from tools.fleet_compose import ROUTER_FLAGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(workers: list[str], policy: str, log: Path, fleet: bool = True) -> tuple[subprocess.Popen, str]:
    """A router with the fleet's flags but `policy`, or with vllm-router's defaults but `policy` (fleet=False)."""
    flags = list(ROUTER_FLAGS) if fleet else ["--policy", policy]
    flags[flags.index("--policy") + 1] = policy
    port = free_port()
    binary = shutil.which("vllm-router", path=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    if binary is None:
        sys.exit("no vllm-router: pip install vllm-router==0.1.17")
    command = [binary, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
               "--worker-urls", *workers, *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readiness", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"router not ready:\n{log.read_text()}")


def stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def report(name: str, results: list, seconds: float) -> None:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    print(f"{name:<24} {tokens / seconds:8.1f} tok/s  first token {percentiles([r.ttfb for r in ok])}  "
          f"errors {len(results) - len(ok)}")  # fmt: skip


def compare(args: argparse.Namespace, replicas: list[str], body: dict, logs: Path) -> None:
    """The same load against replica 0 directly, through a router to replica 0 alone, and through a router to both."""
    targets = [("direct (replica 0)", None, replicas[:1]), ("router -> replica 0", "cache_aware", replicas[:1]),
               ("router -> 2 replicas", "cache_aware", replicas)]  # fmt: skip
    for name, policy, workers in targets:
        router = None
        url = workers[0]
        if policy:
            router, url = start_router(workers, policy, logs / f"router-{len(workers)}.log")
        try:
            asyncio.run(run_load(url, 1, 2, body, args.timeout))  # warm-up, not reported
            report(name, *asyncio.run(run_load(url, args.clients, args.requests, body, args.timeout)))
        finally:
            if router:
                stop(router)


async def failover_load(url: str, clients: int, body: dict, victim: subprocess.Popen, timeout: float) -> tuple:
    """Clients send one request after another; after 2 s one replica gets SIGTERM; 3 s after it exits, they stop."""
    done, errors, running = [], [], True
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            n = 0
            while running:
                n += 1
                response = await http.post("/v1/completions", json={**body, "prompt": f"{c}-{n}"})
                (done if response.status_code == 200 else errors).append(response.status_code)

    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    await asyncio.sleep(2)
    victim.send_signal(signal.SIGTERM)
    while victim.poll() is None:
        await asyncio.sleep(0.1)
    await asyncio.sleep(3)
    running = False
    await asyncio.gather(*tasks)
    return done, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-demo")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="diffusion steps per canvas")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--failover", action="store_true", help="count client errors when a replica is stopped")
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "power_of_two"])
    parser.add_argument("--router-defaults", action="store_true",
                        help="with --failover: vllm-router's default health and retry settings and no drain announce "
                        "(DGSERVE_DRAIN_ANNOUNCE=0), to see what the fleet's settings buy")  # fmt: skip
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="CPU threads per replica (default: half the cores): two replicas must not oversubscribe "
                        "the CPU, where OpenMP's spinning threads slow both many times over")  # fmt: skip
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the replicas inherit it
    if args.router_defaults:
        os.environ["DGSERVE_DRAIN_ANNOUNCE"] = "0"

    logs = Path(tempfile.mkdtemp())
    body = {"model": "bench", "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "diffusion": {"steps": args.steps}}  # fmt: skip
    print(f"{args.clients} clients, {args.max_tokens} tokens per request, {args.steps} steps per canvas")
    for policy in args.policies if args.failover else [None]:
        ports = [free_port(), free_port()]
        replicas = [start_server(args.model, port, args.clients, logs / f"replica{port}.log") for port in ports]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        try:
            if not args.failover:
                compare(args, urls, body, logs)
                continue
            router, url = start_router(urls, policy, logs / f"router-{policy}.log", fleet=not args.router_defaults)
            try:
                done, errors = asyncio.run(failover_load(url, args.clients, body, replicas[0], args.timeout))
            finally:
                stop(router)
            print(f"failover {policy:<14} {len(done)} served, {len(errors)} client errors {sorted(set(errors))}")
        finally:
            for replica in replicas:
                if replica.poll() is None:
                    stop(replica)


if __name__ == "__main__":
    main()
