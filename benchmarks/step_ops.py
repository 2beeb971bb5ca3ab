"""Ops and host syncs in one denoising step (`Engine.step()` with every row denoising) on a checkpoint with the real
model's structure at a tiny width, at B = 1, 4 and 16, for each weight format and the kernels each GPU class runs.
Counts aten ops through a TorchDispatchMode; an op is "syncing" when it waits on the device or sizes its output from
data (nonzero, unique, bincount, item, ...).

A GPU class's kernels are chosen as on that GPU (models.gemm_path) and run on CPU tensors; the GEMMs that have no CPU
kernel (the Triton grouped GEMM outside its interpreter, torch's fp8 grouped GEMM) are counted and answered with
zeros of the shape their meta kernels give, as the meta device would: op counts do not depend on values.

    python -m benchmarks.step_ops [--rows 1,4,16] [--quantization none,fp8,nvfp4] [--device-class cpu,sm89,sm90]
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch
from torch._subclasses import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig
from engine.engine import Engine, LoadedModel
from engine.request import Request, SamplingParams
from models.gemm_path import DEVICE_CLASS_CHOICES
from models.loader import choose_kernels, load_model
from models.random_checkpoint import write_random_checkpoint

# Ops that wait for the device (a value read by the host) or whose output shape depends on data.
SYNCING = {
    "aten::nonzero", "aten::nonzero_static", "aten::bincount", "aten::unique_consecutive", "aten::_unique",
    "aten::_unique2", "aten::unique_dim", "aten::masked_select", "aten::_local_scalar_dense", "aten::item",
    "aten::multinomial", "aten::repeat_interleave.Tensor", "aten::repeat_interleave.self_Tensor",
}  # fmt: skip


# GPU GEMMs without a CPU kernel (outside Triton's interpreter): OpCounter answers them with zeros.
GPU_ONLY = {"dgserve::triton_grouped_gemm", "aten::_scaled_grouped_mm"}


class OpCounter(TorchDispatchMode):
    """Names of the aten ops dispatched inside the mode; boolean-mask indexing is also recorded as `bool-index`.
    `stand_in`: answer the GPU_ONLY ops with zeros of their output's shape instead of running them."""

    def __init__(self, stand_in: bool = False) -> None:
        super().__init__()
        self.stand_in = stand_in
        self.ops: collections.Counter[str] = collections.Counter()
        self.variants: collections.Counter[str] = collections.Counter()  # data-dependent forms of ordinary ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops[name] += 1
        if func._overloadname in ("Tensor", "self_Tensor"):  # tensor repeats: the output size comes from data
            self.variants[f"{name}.{func._overloadname}"] += 1
        indices = [i for a in args if isinstance(a, list | tuple) for i in a if isinstance(i, torch.Tensor)]
        if name.startswith("aten::index") and any(i.dtype == torch.bool for i in indices):
            self.variants["bool-index"] += 1
        if self.stand_in and name in GPU_ONLY:
            return _zeros_like_output(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def syncing(self) -> dict[str, int]:
        counts = self.ops + self.variants
        return {name: n for name, n in counts.items() if name in SYNCING or name == "bool-index"}


def _zeros_like_output(func, args, kwargs) -> torch.Tensor:
    """Zeros of the output that func's meta (fake) kernel gives for these arguments. torch's fp8 grouped GEMM gives
    bf16 only; these counts run the model in fp32 (bf16 GEMMs crawl on CPU), so its output is sized by hand."""
    if func._schema.name == "aten::_scaled_grouped_mm":
        named = {arg.name: value for arg, value in zip(func._schema.arguments, args, strict=False)} | kwargs
        return torch.zeros(named["self"].shape[0], named["mat2"].shape[-1], dtype=named.get("out_dtype"))
    with FakeTensorMode() as fake:
        out = func(*pytree.tree_map_only(torch.Tensor, fake.from_tensor, args), **kwargs)
    return torch.zeros(out.shape, dtype=out.dtype)


def denoising_engine(checkpoint: str, rows: int, model: LoadedModel | None = None, **config) -> Engine:
    """An engine with `rows` sequences past their prefill, mid-canvas (no canvas finishes in the next step);
    `model`: already loaded (load_model's result) instead of read from `checkpoint`."""
    engine = Engine(EngineConfig(checkpoint, device="cpu", dtype="float32", max_num_seqs=rows,
                                 kv_budget_bytes=rows * 2**30, **config), model=model)  # fmt: skip
    params = SamplingParams(max_tokens=256, steps=48, stability_threshold=100, seed=0)
    for i in range(rows):
        engine.add_request(Request(f"r{i}", tuple(list(range(3, 11 + i))), params))
    while any(s.to_encode or s.canvas_steps == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def count_step(engine: Engine, stand_in: bool = False) -> OpCounter:
    with OpCounter(stand_in) as counter:
        engine.step()
    return counter


def count_formats(
    checkpoint: str, schemes: list[str | None], device_classes: list[str], rows: list[int]
) -> dict[tuple[str | None, str, int], tuple[OpCounter, str]]:
    """(scheme, device class, rows) -> (the step's ops, the experts' path): each format loaded once (quantized at
    load), its kernels then chosen as on each device class for a bf16 model. The step runs in fp32, since bf16 GEMMs
    crawl on CPU; the ops are the same."""
    results = {}
    for scheme in schemes:
        loaded = load_model(checkpoint, torch.float32, "cpu", progress=False, expert_row_alignment=4,
                            quantization=scheme)  # fmt: skip
        for device_class in device_classes:
            choose_kernels(loaded[0], torch.device("cpu"), torch.bfloat16, device_class)
            path = str(loaded[0].layers[0].experts.path)
            for r in rows:
                with OpCounter(stand_in=True):  # the prefill and first step, uncounted
                    engine = denoising_engine(checkpoint, r, model=loaded)
                results[scheme, device_class, r] = count_step(engine, stand_in=True), path
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--vocab-chunk", type=int, help="sampler chunk (default: the CPU's 2048; CUDA uses 8192)")
    parser.add_argument("--quantization", default="none", help="comma list of none, fp8, nvfp4")
    parser.add_argument("--device-class", default="cpu", help=f"comma list of {', '.join(DEVICE_CLASS_CHOICES)}")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    schemes = [None if q == "none" else q for q in args.quantization.split(",")]
    classes = args.device_class.split(",")
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(directory, "structure", seed=0, dtype=torch.bfloat16)
        if schemes == [None] and classes == ["cpu"]:  # the engine exactly as it loads on this CPU
            for r in rows:
                counter = count_step(denoising_engine(directory, r, vocab_chunk=args.vocab_chunk))
                syncing = counter.syncing()
                print(
                    f"B={r:>2}: {sum(counter.ops.values()):>6} aten ops, {sum(syncing.values()):>4} syncing {syncing}"
                )
            return
        results = count_formats(directory, schemes, classes, rows)
    for (scheme, device_class, r), (counter, path) in results.items():
        ops, syncing = sum(counter.ops.values()), counter.syncing()
        dense = results.get((None, device_class, r))
        ratio = f"{ops / sum(dense[0].ops.values()):.2f}x bf16" if dense else ""
        print(f"{scheme or 'bf16':>5} {device_class:>5} B={r:>2}: {ops:>6} aten ops ({ratio}), "
              f"{sum(syncing.values())} syncing; {path}")  # fmt: skip


if __name__ == "__main__":
    main()
