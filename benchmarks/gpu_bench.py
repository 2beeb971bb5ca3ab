"""The denoising step on one GPU with the real model's shapes: parity on the device, ms per step eager / compiled /
CUDA graphs at B = 1, 4, 16 and 1K / 4K context, the transformers reference step, peak memory, each against the
spec 8.3 floor; then the same step with fp8 and nvfp4 experts (quantized at build, as `--quantization` does), each
with the expert path it took (models.gemm_path) and its parity against the dequantised weights; and (`--modes
stress`) a stress run of 16 concurrent 8K-token prompts at the largest batch the memory budget allows, which must end
with no failed request, printing the profiled memory split against the allocator's peak. Needs only torch,
transformers and safetensors (and the triton that CUDA torch brings): the real-shaped model is built with random
weights on the GPU itself (no download, no 50 GB file).

    bash benchmarks/gpu_check.sh                     # one NVIDIA GPU, under 9 minutes
    python -m benchmarks.gpu_bench --device cpu --size structure --rows 1 2 --contexts 300 --modes eager graphs
                                                     # the same code paths on a CPU, in a few minutes
    python -m benchmarks.gpu_bench --device cpu --size tiny --dtype float32 --skip-parity --modes stress \
        --stress-prompt 256 --stress-seconds 20       # the stress run's code path on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.memory import LiveBytes
from engine.request import BlockCommitted, Failed, Finished, Request, SamplingParams
from models.quantized_checkpoint import write_quantized_checkpoint
from models.random_checkpoint import config_json, random_model, write_random_checkpoint

# Spec 8.3, H100 SXM, bf16, unfused sampler, L = 4K: the bandwidth/compute floor of one denoising forward (ms).
FLOOR_MS = {1: 17.8, 4: 19.1, 16: 53.9}
WARMUP, TIMED = 3, 10  # steps per measurement; a canvas never stops within them
TPF = 16  # tokens per forward for the tok/s column (spec 8.3's middle case)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(device: torch.device) -> None:
    """Reference mode against transformers' generate() on the tiny config, on this device, fp32 and bf16."""
    from transformers import DiffusionGemmaForBlockDiffusion

    prompt = [2, 105, 236, 107, 925, 106, 107, 105, 436, 107]  # inside the tiny vocabulary of 2,048
    for dtype in (torch.float32, torch.bfloat16):
        with tempfile.TemporaryDirectory() as directory:
            write_random_checkpoint(directory, "tiny", seed=0, dtype=torch.float32)
            reference = DiffusionGemmaForBlockDiffusion.from_pretrained(directory, dtype=dtype).to(device).eval()
            torch.manual_seed(0)
            with torch.no_grad():
                out = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=64)
            sequences = out.sequences if hasattr(out, "sequences") else out
            expected = sequences[0, len(prompt) :].tolist()
            config = EngineConfig(directory, device=str(device), dtype=str(dtype).removeprefix("torch."),
                                  max_num_seqs=1, reference_mode=True, kv_budget_bytes=2**26)  # fmt: skip
            events = Engine(config).generate({"r": (prompt, SamplingParams(max_tokens=64, seed=0))})["r"]
        ours = [t for e in events if isinstance(e, BlockCommitted) for t in e.token_ids]
        same = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b), min(len(ours), 64))
        verdict = "PASS" if ours == expected[: len(ours)] else "DIFF"
        print(f"parity {dtype!s:15s} reference mode vs generate(): {verdict}, first {same} tokens equal")


def quantized_parity(device: torch.device, scheme: str) -> None:
    """Reference-mode tokens of a tiny quantized checkpoint on this device, through the path it takes here, against
    its dequantised twin on the CPU (exact), in fp32. Weight-only paths (fp8 before sm89, nvfp4) should be equal;
    W8A8 quantizes activations too, so its tokens part at the first close call."""
    prompt, params = [2, 105, 236, 107, 925, 106, 107], SamplingParams(max_tokens=64, seed=0)
    tokens, paths = [], []
    with tempfile.TemporaryDirectory() as directory:
        fmt = "fp8" if scheme == "fp8" else "nvfp4-modelopt"
        checkpoint = write_quantized_checkpoint(f"{directory}/q", fmt, "tiny", twin=f"{directory}/twin")
        for path, where in ((checkpoint, device), (f"{directory}/twin", torch.device("cpu"))):
            engine = Engine(EngineConfig(str(path), device=str(where), dtype="float32", max_num_seqs=1,
                                         reference_mode=True, kv_budget_bytes=2**26))  # fmt: skip
            paths.append(str(engine.model.layers[0].experts.path))
            events = engine.generate({"r": (prompt, params)})["r"]
            tokens.append([t for e in events if isinstance(e, BlockCommitted) for t in e.token_ids])
    ours, expected = tokens
    same = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b), len(ours))
    verdict = "PASS" if ours == expected else "DIFF"
    print(f"parity {scheme:5s} fp32, {paths[0]}, vs dequantised on the CPU: {verdict}, first {same} tokens equal")


def denoising(engine: Engine, rows: int, context: int) -> list[str]:
    """`rows` sequences with `context`-token prompts, prefilled and mid-canvas; returns their request ids."""
    params = SamplingParams(max_tokens=512, steps=48, stability_threshold=1000, stop_token_ids=())
    ids = [f"{context}-{rows}-{i}-{time.monotonic_ns()}" for i in range(rows)]
    for i, request_id in enumerate(ids):
        prompt = torch.randint(3, engine.info.vocab_size, (context,), generator=torch.Generator().manual_seed(i))
        prompt = prompt.tolist()
        engine.add_request(Request(request_id, tuple(prompt), params))
    while engine.scheduler.waiting or any(s.to_encode or not s.canvas_steps for s in engine.scheduler.running):
        engine.step()
    return ids


def ms_per_step(engine: Engine, rows: int, context: int) -> float:
    ids = denoising(engine, rows, context)
    for _ in range(WARMUP):
        engine.step()
    sync(engine.config.torch_device)
    start = time.perf_counter()
    for _ in range(TIMED):
        engine.step()  # each step ends with its results copy: it waits for the device
    elapsed = (time.perf_counter() - start) / TIMED * 1e3
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    return elapsed


def reference_ms(size: str, device: torch.device, dtype: torch.dtype, rows: int, context: int) -> float | None:
    """transformers' decoder forward per denoising step (with SC, LM head and softcap), as generate() calls it."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    with torch.device(device):
        config = DiffusionGemmaConfig.from_dict(config_json(size))
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype).eval()  # built in dtype: 50 GB
    forward, calls = model.forward, []

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync(device)
        calls.append(time.perf_counter() - start)
        return out

    model.forward = timed
    ids = torch.randint(3, config.text_config.vocab_size, (rows, context), device=device)
    steps = WARMUP + TIMED
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=256, max_denoising_steps=steps, stability_threshold=steps + 1)
    except torch.OutOfMemoryError:
        return None
    finally:
        del model
        release(device)
    return sum(calls[WARMUP:]) / TIMED * 1e3


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    name: str, make: Callable[[], Engine], rows: list[int], contexts: list[int], results: dict, device: torch.device
) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    engine = make()
    print(f"{name}: engine ready in {time.perf_counter() - start:.0f} s", flush=True)
    for context in contexts:
        for b in rows:
            results[name, b, context] = ms_per_step(engine, b, context)
            print(f"  {name:8s} B={b:<2d} L={context:<5d} {results[name, b, context]:8.1f} ms/step", flush=True)
            if name == "graphs":  # the same compiled step, run without its CUDA graphs
                buckets, engine.runner.graphs.buckets = engine.runner.graphs.buckets, {}
                results["compiled", b, context] = ms_per_step(engine, b, context)
                engine.runner.graphs.buckets = buckets
                print(f"  {'compiled':8s} B={b:<2d} L={context:<5d} {results['compiled', b, context]:8.1f} ms/step")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB", flush=True)
    del engine
    release(device)


def stress(make: Callable[[], Engine], prompt_len: int, seconds: float, device: torch.device) -> bool:
    """16 concurrent requests with `prompt_len`-token prompts for `seconds`: the scheduler admits as many as the KV
    budget holds and queues the rest. Returns whether no request failed. Prints the engine's memory split against what
    was measured: on CUDA the allocator's peak, elsewhere LiveBytes' activation peak over the run."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine = make()
    params = SamplingParams(max_tokens=512, steps=8, stop_token_ids=())
    for i in range(16):
        prompt = torch.randint(3, engine.info.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(i))
        engine.add_request(Request(f"stress-{i}", tuple(prompt.tolist()), params))
    tracker = LiveBytes()
    failed, finished, steps, batch = [], 0, 0, 0
    start = time.perf_counter()
    with contextlib.nullcontext() if cuda else tracker:
        while engine.has_unfinished() and time.perf_counter() - start < seconds:
            events, stats = engine.step()
            steps, batch = steps + 1, max(batch, stats.num_running)
            failed += [e.error for e in events if isinstance(e, Failed)]
            finished += sum(isinstance(e, Finished) for e in events)
    sync(device)
    elapsed = time.perf_counter() - start
    split = engine.memory
    print(f"stress: {prompt_len}-token prompts x 16, {steps} iterations in {elapsed:.0f} s, up to {batch} running at "
          f"once, {finished} finished, {len(failed)} failed{f' ({failed[0]})' if failed else ''}")  # fmt: skip
    print(f"  memory split (activations profiled): {split}, {split.total / 2**30:.2f} GiB in all")
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        print(f"  torch.cuda.max_memory_allocated {peak / 2**30:.2f} GiB against the split's {split.total / 2**30:.2f}")
    else:
        profiled = split.activations / 2**20
        print(f"  live activations peak {tracker.peak / 2**20:.1f} MiB against the profiled {profiled:.1f} MiB")
    print(f"  {'PASS' if not failed else 'FAIL'}: no request failed")
    return not failed


def report(results: dict, rows: list[int], contexts: list[int], modes: list[str]) -> None:
    print(f"\nms per denoising step (tok/s at {TPF} tokens per forward); floor = spec 8.3 bf16 H100 at L = 4K")
    shown = {*modes, *(["compiled"] if "graphs" in modes else [])}
    names = [m for m in ("reference", "eager", "compiled", "graphs") if m in shown]
    print(f"   B      L | {' | '.join(f'{n:>17s}' for n in names)} | floor  best/floor")
    for context in contexts:
        for b in rows:
            cells = [results.get((n, b, context)) for n in names]
            text = " | ".join(f"{'-':>17s}" if ms is None else f"{ms:7.1f} ({b * TPF / ms * 1e3:6.0f})" for ms in cells)
            best = min((ms for ms in cells[1:] if ms is not None), default=None)
            floor = FLOOR_MS.get(b)
            ratio = "-" if best is None or floor is None else f"{best / floor:.2f}x"
            print(f"{b:4d} {context:6d} | {text} | {floor or '-':>5} {ratio:>10s}")
    best = {(b, c): min((results[m, b, c] for m in ("eager", "compiled", "graphs") if (m, b, c) in results),
                        default=None) for b in rows for c in contexts}  # fmt: skip
    if 1024 in contexts:
        print("\ntargets (bf16, L = 1K)")
        checks = [
            ("B=1 <= 25 ms per step", best.get((1, 1024)), lambda v: v <= 25),
            ("B=16 <= 60 ms per step", best.get((16, 1024)), lambda v: v <= 60),
        ]
        for name, value, ok in checks:
            print(f"  {'n/a ' if value is None else 'PASS' if ok(value) else 'MISS'}  {name}: {value or '-'}")
        one, four = best.get((1, 1024)), best.get((4, 1024))
        gain = None if one is None or four is None else 4 * one / four
        verdict = "n/a " if gain is None else "PASS" if gain >= 3.4 else "MISS"
        print(f"  {verdict}  B=4 >= 3.4x the tokens/s of B=1: {'-' if gain is None else f'{gain:.2f}x'}")


def quantized(args: argparse.Namespace, scheme: str, results: dict, device: torch.device, dtype: torch.dtype) -> None:
    """The step with `scheme` experts (and linears, for fp8): parity, then ms per step against bf16's."""
    if not args.skip_parity:
        quantized_parity(device, scheme)
    model = random_model(args.size, dtype, device, quantization=scheme)
    print(f"{args.size} model, {scheme}: {model[0].layers[0].experts.path}")
    context = args.contexts[0]
    budget = max(args.rows) * (300 * 2**20 + ((context + 768) // 256 + 1) * 6 * 2**20) + 2**30
    for mode in args.quantized_modes:
        config = EngineConfig(
            args.size, device=args.device, dtype=args.dtype, max_num_seqs=max(args.rows), kv_budget_bytes=budget,
            compile=mode == "graphs", max_capture_len=context + 768,
        )  # fmt: skip
        make = lambda config=config, model=model: Engine(config, model=model)  # noqa: E731
        measured: dict = {}
        measure(mode, make, args.rows, [context], measured, device)
        for (name, b, c), ms in measured.items():
            bf16 = results.get((name, b, c))
            ratio = "" if bf16 is None else f" ({bf16 / ms:.2f}x the speed of bf16 {name})"
            print(f"  {scheme} {name:8s} B={b:<2d} L={c:<5d} {ms:8.1f} ms/step{ratio}")
    del model
    release(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="real", help="model shapes (models/random_checkpoint.py SIZES)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument(
        "--modes", nargs="+", default=["reference", "eager", "graphs"],
        help="reference, eager, graphs (graphs also measures the compiled step without its CUDA graphs), stress",
    )  # fmt: skip
    parser.add_argument("--quantizations", nargs="*", default=["fp8", "nvfp4"], help="formats measured after bf16")
    parser.add_argument("--quantized-modes", nargs="+", default=["eager"], help="their modes, at the first context")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--stress-prompt", type=int, default=8192, help="prompt tokens of the stress run's requests")
    parser.add_argument("--stress-seconds", type=float, default=30)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not args.skip_parity:
        parity(device)
    results: dict = {}
    passed = True
    if {"eager", "graphs", "stress"} & set(args.modes):
        model = random_model(args.size, dtype, device)
        print(f"{args.size} model: {sum(p.numel() for p in model[0].parameters()) / 1e9:.2f} B parameters, {dtype}")
        longest = max(args.contexts) + 512 + 256
        budget = max(args.rows) * (300 * 2**20 + (longest // 256 + 1) * 6 * 2**20) + 2**30  # rings + pages, real
        for mode in ("eager", "graphs"):
            if mode in args.modes:
                config = EngineConfig(
                    args.size, device=args.device, dtype=args.dtype, max_num_seqs=max(args.rows),
                    kv_budget_bytes=budget, compile=mode == "graphs", max_capture_len=longest,
                )  # fmt: skip
                make = lambda config=config: Engine(config, model=model)  # noqa: E731
                measure(mode, make, args.rows, args.contexts, results, device)
        if "stress" in args.modes:  # the KV budget sized by the engine's own profile, as `dgserve serve` sizes it
            config = EngineConfig(args.size, device=args.device, dtype=args.dtype, max_num_seqs=16,
                                  max_model_len=args.stress_prompt + 512)  # fmt: skip
            passed = stress(lambda: Engine(config, model=model), args.stress_prompt, args.stress_seconds, device)
            release(device)
        del model
        release(device)
    if "reference" in args.modes:
        for context in args.contexts:
            for b in args.rows:
                results["reference", b, context] = reference_ms(args.size, device, dtype, b, context)
                ms = results["reference", b, context]
                print(f"  reference B={b:<2d} L={context:<5d} {'OOM' if ms is None else f'{ms:8.1f}'} ms/step")
    if results:
        report(results, args.rows, args.contexts, args.modes)
    for scheme in args.quantizations:
        quantized(args, scheme, results, device, dtype)
    print(f"\ngpu_bench took {time.perf_counter() - start:.0f} s")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
