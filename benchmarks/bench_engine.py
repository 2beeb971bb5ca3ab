"""Engine vs transformers reference on the "bench" checkpoint (real 262,144 vocabulary, small everything else).

Both run fp32 on CPU with 2 threads, one 256-token canvas per sequence and exactly N denoising steps
(`steps=N, stability_threshold=N+1`, spec 12). Per batch size B it reports output tokens/s, ms per
denoising step (the reference's split into forward and sampler) and memory growth during generation, then checks:
ours >= 6x the reference's tok/s at B=1, >= 6x at B=4 against the reference run one sequence at a time, and
memory growth per row <= 1/10 of the reference's.

Every measurement runs in a fresh spawned process, after one short warm-up generation. The machine is shared, so
each run also records the CPU time other processes took while it ran ("others s"), and a measurement during which
they kept more than 5 % of the CPUs busy is repeated, up to 3 attempts.

    python -m benchmarks.bench_engine                      # N=16, B=1 2 4: about 8 minutes
    python -m benchmarks.bench_engine --steps 4 --rows 1 2 # smoke check
    python -m benchmarks.bench_engine --compiled           # also our step compiled by inductor
    python -m benchmarks.bench_engine --skip-reference --baseline ../before  # this tree against another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, Request, SamplingParams
from models.random_checkpoint import write_random_checkpoint

CANVAS = 256  # new tokens per sequence: one canvas
PROMPT_LEN = 32
WARMUP_STEPS = 2
ATTEMPTS, CONTENDED = 3, 0.05  # re-measure while other processes keep more than this share of the CPUs busy
MiB = 2**20
Result = dict[str, float]


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields[field].split()[0]) * 1024


def reset_peak_rss() -> None:
    # Not ru_maxrss: it counts the transient mmap of the safetensors file while loading, and a spawned child
    # inherits its parent's high-water mark through exec. VmHWM after this reset is the peak of this process only.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def others_cpu_s() -> float:
    """CPU seconds the machine has spent outside this process (steal included): contention on a shared machine."""
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - own.ru_utime - own.ru_stime


def prompt_ids(seed: int) -> list[int]:
    return torch.randint(3, 2048, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_reference(checkpoint: str, steps: int, rows: int) -> Result:
    """transformers' generate() on B rows in one call; forward and sampler split by wrapping model.forward."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging

    torch.set_num_threads(2)
    logging.disable_progress_bar()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():  # the weights stay mmapped until first read: page them in now, not as growth
        for param in model.parameters():
            param.sum()
    loaded = rss_bytes("VmRSS")
    reset_peak_rss()
    ids = torch.tensor([prompt_ids(i) for i in range(rows)])

    def generate(batch: torch.Tensor, n: int) -> None:
        torch.manual_seed(0)
        model.generate(batch, max_new_tokens=CANVAS, max_denoising_steps=n, stability_threshold=n + 1)

    generate(ids[:1], WARMUP_STEPS)
    calls: list[tuple[float, float]] = []  # (start, end) of each decoder forward
    decoder_forward = model.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = decoder_forward(*args, **kwargs)
        calls.append((start, time.perf_counter()))
        return out

    model.forward = timed_forward  # generate() calls self.forward once per denoising step
    others, t0 = others_cpu_s(), time.perf_counter()
    generate(ids, steps)
    t1, others = time.perf_counter(), others_cpu_s() - others
    if len(calls) != steps:
        raise RuntimeError(f"reference ran {len(calls)} denoising steps, expected {steps}")
    forward = sum(end - start for start, end in calls)
    # Everything after the first decoder call that is not a decoder call is sampling and stop checks.
    sampler = t1 - calls[0][0] - forward
    encode = calls[0][0] - t0  # prefill, plus input preparation
    return result(rows, t1 - t0, others, forward / steps, sampler / steps, encode, loaded)


def run_engine(checkpoint: str, steps: int, rows: int, compile: bool = False) -> Result:
    """Our engine with B requests added before the first step; times from its StepStats. `compile`: the step
    compiled by inductor (compiled at start, outside the timed run)."""
    torch.set_num_threads(2)
    config = EngineConfig(checkpoint=checkpoint, dtype="float32", max_num_seqs=4, kv_budget_bytes=2**30,
                          compile=compile, max_capture_len=PROMPT_LEN + CANVAS)  # fmt: skip
    engine = Engine(config)
    loaded = rss_bytes("VmRSS")
    reset_peak_rss()

    def params(n: int, seed: int) -> SamplingParams:
        # No stop tokens, so that every sequence yields its whole canvas, as the reference's output does.
        return SamplingParams(max_tokens=CANVAS, steps=n, stability_threshold=n + 1, seed=seed, stop_token_ids=())

    engine.generate({"warmup": (prompt_ids(0), params(WARMUP_STEPS, 0))})
    for i in range(rows):
        engine.add_request(Request(f"r{i}", tuple(prompt_ids(i)), params(steps, i)))
    tokens, denoise, encode = 0, [], 0.0
    others, t0 = others_cpu_s(), time.perf_counter()
    while engine.has_unfinished():
        events, stats = engine.step()
        tokens += sum(len(e.token_ids) for e in events if isinstance(e, BlockCommitted))
        encode += stats.encode_s
        if stats.num_denoise_rows:
            denoise.append(stats)
    wall, others = time.perf_counter() - t0, others_cpu_s() - others
    if tokens != rows * CANVAS or len(denoise) != steps or any(s.num_denoise_rows != rows for s in denoise):
        raise RuntimeError(f"engine produced {tokens} tokens in {len(denoise)} steps, not a {rows}-row batch")
    step = sum(s.denoise_s for s in denoise) / steps
    return result(rows, wall, others, step, None, encode, loaded)


def run_compiled(checkpoint: str, steps: int, rows: int) -> Result:
    return run_engine(checkpoint, steps, rows, compile=True)


def run_baseline(tree: str, checkpoint: str, steps: int, rows: int) -> Result:
    """run_engine of another checkout (a git worktree of an earlier commit), in a process that imports its code."""
    call = f"run_engine({checkpoint!r}, {steps}, {rows})"
    code = f"import json; from benchmarks.bench_engine import run_engine; print(json.dumps({call}))"
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def result(
    rows: int, wall: float, others: float, forward: float, sampler: float | None, encode: float, loaded: int
) -> Result:
    """forward: the reference's decoder forward, or our whole step (decoder and sampler); sampler: the reference's
    sampling between forwards (None for ours)."""
    peak = rss_bytes("VmHWM")
    return {
        "rows": rows,
        "wall_s": wall,
        "others_cpu_s": others,
        "tok_s": rows * CANVAS / wall,
        "step_ms": (forward + (sampler or 0)) * 1e3,
        "forward_ms": forward * 1e3,
        "sampler_ms": None if sampler is None else sampler * 1e3,
        "encode_ms": encode * 1e3,
        "loaded_mib": loaded / MiB,
        "peak_mib": peak / MiB,
        "growth_mib": (peak - loaded) / MiB,
    }


def contention(runs: list[Result]) -> float:
    """Share of the machine's CPUs that other processes used during these runs."""
    return sum(r["others_cpu_s"] for r in runs) / sum(r["wall_s"] for r in runs) / (os.cpu_count() or 1)


def measure(fn: Callable[[str, int, int], Result], checkpoint: str, steps: int, rows: int) -> Result:
    """One measurement in a fresh process, repeated while the machine was busy with other work."""
    for attempt in range(ATTEMPTS):
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            run = pool.submit(fn, checkpoint, steps, rows).result()
        if (busy := contention([run])) <= CONTENDED or attempt == ATTEMPTS - 1:
            break
        name = getattr(fn, "func", fn).__name__  # a partial names its function
        print(f"{name} B={rows}: other processes used {busy:.0%} of the CPUs, measuring again", flush=True)
    return run


def bench_checkpoint() -> Path:
    """The bench checkpoint in the user's cache, written once (atomically, by renaming a finished directory)."""
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dgserve" / "bench-checkpoint-seed0"
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=path.parent))
        write_random_checkpoint(tmp, "bench", seed=0, dtype=torch.float32)
        tmp.rename(path)
    return path


def per_row_growth(runs: list[Result]) -> float | None:
    """Memory growth per extra row, between the smallest and the largest batch."""
    if len(runs) < 2:
        return None
    lo, hi = runs[0], runs[-1]
    return (hi["growth_mib"] - lo["growth_mib"]) / (hi["rows"] - lo["rows"])


def num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cell(run: Result | None, key: str, width: int, decimals: int) -> str:
    return num(None if run is None else run[key], f"{width}.{decimals}f").rjust(width)


def print_tables(ref: dict[float, Result], ours: list[Result], compiled: dict[float, Result], steps: int) -> None:
    one_by_one = ref.get(1)
    print(f"\nbench checkpoint, fp32 CPU, 2 threads, {steps} denoising steps, {CANVAS} new tokens per sequence")
    print("ref 1by1 = the reference run one sequence at a time (its B=1 rate); ratio = ours / ref 1by1")
    print("ms/step: ref fwd = decoder + SC embedding + LM head, ref smp = its sampling; ours = the whole step")
    print("(decoder, LM head, SC embedding and sampler); comp = ours compiled by inductor; enc = prefill of all rows\n")
    print(
        "   B | ref 1by1 tok/s  ref batched |  ours tok/s  ratio | comp tok/s  ratio | ref fwd  ref smp |"
        " ours ms  comp ms  enc ms | others s: ref  ours"
    )

    def ratio(run: Result | None) -> str:
        value = None if one_by_one is None or run is None else run["tok_s"] / one_by_one["tok_s"]
        return num(value, "5.1f").rjust(5) + "x"

    for run in ours:
        batched, comp = ref.get(run["rows"]), compiled.get(run["rows"])
        print(
            f"{run['rows']:4.0f} | {cell(one_by_one, 'tok_s', 14, 2)} {cell(batched, 'tok_s', 12, 2)} |"
            f" {run['tok_s']:11.2f} {ratio(run)} | {cell(comp, 'tok_s', 10, 2)} {ratio(comp)} |"
            f" {cell(batched, 'forward_ms', 7, 0)} {cell(batched, 'sampler_ms', 8, 0)} |"
            f" {run['step_ms']:7.1f} {cell(comp, 'step_ms', 8, 1)} {run['encode_ms']:7.1f} |"
            f" {cell(batched, 'others_cpu_s', 13, 1)} {run['others_cpu_s']:5.1f}"
        )
    print("\nmemory, MiB: RSS after load, growth = peak RSS over warm-up + generation - RSS after load")
    print("   B | ref loaded  ref growth | ours loaded  ours growth")
    for run in ours:
        batched = ref.get(run["rows"])
        print(
            f"{run['rows']:4.0f} | {cell(batched, 'loaded_mib', 10, 0)} {cell(batched, 'growth_mib', 11, 0)} |"
            f" {run['loaded_mib']:11.0f} {run['growth_mib']:12.0f}"
        )


def report(ref_runs: list[Result], ours_runs: list[Result], compiled_runs: list[Result], steps: int) -> dict[str, Any]:
    """Print the tables and the targets; returns the summary numbers."""
    ref, ours = {r["rows"]: r for r in ref_runs}, {r["rows"]: r for r in ours_runs}
    print_tables(ref, ours_runs, {r["rows"]: r for r in compiled_runs}, steps)
    ref_row, ours_row = per_row_growth(ref_runs), per_row_growth(ours_runs)
    print(f"growth per row, MiB: ref {num(ref_row, '.0f')}, ours {num(ours_row, '.0f')}")

    def speedup(rows: int) -> float | None:
        return ours[rows]["tok_s"] / ref[1]["tok_s"] if 1 in ref and rows in ours else None

    # Flat (or, by allocator noise, negative) growth counts as 1 MiB per row.
    memory = None if ref_row is None or ours_row is None else ref_row / max(ours_row, 1.0)
    targets = [
        ("ours >= 6x reference tok/s at 1 sequence", speedup(1), 6.0),
        ("ours >= 6x reference run one by one, aggregate at 4 sequences", speedup(4), 6.0),
        ("memory growth per row <= 1/10 of the reference's (ref / ours)", memory, 10.0),
    ]
    print("\ntargets")
    for name, value, goal in targets:
        verdict = "n/a " if value is None else "PASS" if value >= goal else "MISS"
        print(f"  {verdict}  {name}: {'-' if value is None else f'{value:.1f}x'} (goal {goal:g}x)")
    return {
        "growth_per_row_mib": {"reference": ref_row, "ours": ours_row},
        "targets": {name: {"value": value, "goal": goal} for name, value, goal in targets},
    }


def against_baseline(baseline: list[Result], ours: list[Result], tree: Path) -> list[dict[str, float]]:
    """Print this tree's engine against the baseline checkout's, measured in the same run."""
    print(f"\nthis tree against the baseline {tree} (ratio = this / baseline; ms/step: lower is better)")
    print("   B | base tok/s  this tok/s  ratio | base ms/step  this ms/step  ratio | base growth  this growth MiB")
    rows = []
    for old, new in zip(baseline, ours, strict=True):
        tok, ms = new["tok_s"] / old["tok_s"], new["step_ms"] / old["step_ms"]
        print(
            f"{new['rows']:4.0f} | {old['tok_s']:10.2f} {new['tok_s']:11.2f} {tok:5.2f}x |"
            f" {old['step_ms']:12.1f} {new['step_ms']:12.1f} {ms:5.2f}x |"
            f" {old['growth_mib']:11.0f} {new['growth_mib']:12.0f}"
        )
        rows.append({"rows": new["rows"], "tok_s_ratio": tok, "step_ms_ratio": ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (fixed)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], help="concurrent sequences, each <= 4")
    parser.add_argument("--checkpoint", help="a bench checkpoint directory; default: write one to the cache")
    parser.add_argument("--skip-reference", action="store_true", help="measure our engine only")
    parser.add_argument("--compiled", action="store_true", help="also measure our step compiled by inductor")
    parser.add_argument("--baseline", type=Path, help="also measure this checkout's engine (e.g. a worktree of main)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    rows = sorted(set(args.rows))
    if rows[0] < 1 or rows[-1] > 4:
        parser.error("--rows must be between 1 and 4 (the engine runs with max_num_seqs=4)")
    checkpoint = str(args.checkpoint or bench_checkpoint())

    start = time.perf_counter()
    ref, ours, compiled, baseline = [], [], [], []
    for b in rows:
        if not args.skip_reference:
            ref.append(measure(run_reference, checkpoint, args.steps, b))
        ours.append(measure(run_engine, checkpoint, args.steps, b))
        if args.compiled:
            compiled.append(measure(run_compiled, checkpoint, args.steps, b))
        if args.baseline:
            baseline.append(measure(partial(run_baseline, str(args.baseline.resolve())), checkpoint, args.steps, b))
    summary = report(ref, ours, compiled, args.steps)
    if baseline:
        summary["baseline"] = against_baseline(baseline, ours, args.baseline)
    # Oversubscribed OpenMP threads lose far more than the share other processes take.
    if (busy := max(contention([r]) for r in ref + ours + compiled)) > CONTENDED:
        print(f"\nWARNING: other processes kept up to {busy:.0%} of the CPUs busy in a measurement; rerun when quiet")
    print(f"\nbenchmark took {time.perf_counter() - start:.0f} s")
    if args.json:
        config = {"steps": args.steps, "rows": rows, "checkpoint": checkpoint, "canvas": CANVAS, "prompt": PROMPT_LEN}
        payload = {"config": config, "reference": ref, "ours": ours, "compiled": compiled, "summary": summary}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
