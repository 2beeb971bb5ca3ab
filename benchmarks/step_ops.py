"""Ops and host syncs in one denoising step (`Engine.step()` with every row denoising) on a checkpoint with the real
model's structure at a tiny width, at B = 1, 4 and 16. Counts aten ops through a TorchDispatchMode; an op is
"syncing" when it waits on the device or sizes its output from data (nonzero, unique, bincount, item, ...).

    python -m benchmarks.step_ops [--rows 1,4,16] [--vocab-chunk 8192]
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from models.random_checkpoint import write_random_checkpoint

# Ops that wait for the device (a value read by the host) or whose output shape depends on data.
SYNCING = {
    "aten::nonzero", "aten::nonzero_static", "aten::bincount", "aten::unique_consecutive", "aten::_unique",
    "aten::_unique2", "aten::unique_dim", "aten::masked_select", "aten::_local_scalar_dense", "aten::item",
    "aten::multinomial", "aten::repeat_interleave.Tensor", "aten::repeat_interleave.self_Tensor",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Names of the aten ops dispatched inside the mode; boolean-mask indexing is also recorded as `bool-index`."""

    def __init__(self) -> None:
        super().__init__()
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
        return func(*args, **(kwargs or {}))

    def syncing(self) -> dict[str, int]:
        counts = self.ops + self.variants
        return {name: n for name, n in counts.items() if name in SYNCING or name == "bool-index"}


def denoising_engine(checkpoint: str, rows: int, **config) -> Engine:
    """An engine with `rows` sequences past their prefill, mid-canvas (no canvas finishes in the next step)."""
    engine = Engine(EngineConfig(checkpoint, device="cpu", dtype="float32", max_num_seqs=rows,
                                 kv_budget_bytes=rows * 2**30, **config))  # fmt: skip
    params = SamplingParams(max_tokens=256, max_denoising_steps=48, stability_threshold=100, seed=0)
    for i in range(rows):
        engine.add_request(f"r{i}", list(range(3, 11 + i)), params)
    while any(s.to_encode or s.canvas_steps == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def count_step(engine: Engine) -> OpCounter:
    with OpCounter() as counter:
        engine.step()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--vocab-chunk", type=int, help="sampler chunk (default: the CPU's 2048; CUDA uses 8192)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(directory, "structure", seed=0, dtype=torch.bfloat16)
        for rows in (int(r) for r in args.rows.split(",")):
            counter = count_step(denoising_engine(directory, rows, vocab_chunk=args.vocab_chunk))
            syncing = counter.syncing()
            print(f"B={rows:>2}: {sum(counter.ops.values()):>6} aten ops, {sum(syncing.values()):>4} syncing {syncing}")


if __name__ == "__main__":
    main()
