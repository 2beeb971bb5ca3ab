"""The compiled denoising step: `torch.compile(fullgraph=True)` of `ModelRunner.step` and, on CUDA, one CUDA graph per
bucket, captured at start.

A step's shapes depend on its bucket alone: the rows (a power of two up to max_num_seqs) and the page table's width
(a power of two, engine/kv_cache.py). Both dimensions are marked dynamic, so one compile serves every bucket; dynamo
specialises the one-row bucket, so the step compiles twice. Each bucket owns static input tensors: a step copies its
inputs into them and replays the bucket's graph (without CUDA graphs, calls the compiled step on them), which writes
the engine's canvas state and KV pool in place and returns the bucket's output tensor.

Page tables wider than `max_capture_len` tokens are compiled but not captured (a graph holds its workspace, which
grows with the width): such steps run the compiled function directly.

A bucket whose compile or capture fails (out of memory, most likely) is logged as an ERROR with the memory it had
taken, and runs the eager step from then on: `eager` names those buckets for /version and /metrics.

A compiled step always runs the SC MLP and the scaled-proposal pass, which eager steps skip where that gives the same
bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import torch

logger = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, torch.Tensor]  # [rows, C + 2] argmax, stop flags, pinned prefixes; [rows, C, H] hidden

StepFn = Callable[..., Outputs]  # ModelRunner.step(inputs, self_condition, scaled_proposals)
InputsFn = Callable[[list, int], dict[str, torch.Tensor]]  # ModelRunner.step_inputs(rows, width) on the host


def powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, ... up to the first power of two >= high (low a power of two)."""
    sizes = [low]
    while sizes[-1] < high:
        sizes.append(sizes[-1] * 2)
    return sizes


class StepGraphs:
    def __init__(
        self,
        step: StepFn,
        step_inputs: InputsFn,
        row_buckets: list[int],
        width_buckets: list[int],  # page-table widths captured at start
        device: torch.device,
        cuda_graphs: bool,
        backend: str | Callable = "inductor",
    ) -> None:
        self.step_inputs, self.device = step_inputs, device
        self.eager_step = partial(step, self_condition=True, scaled_proposals=True)
        self.eager: list[tuple[int, int]] = []  # (rows, pages) of the buckets whose compile or capture failed
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.compiled = torch.compile(self.eager_step, fullgraph=True, backend=backend)
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.buckets: dict[tuple[int, int], tuple[dict[str, torch.Tensor], Callable[[], Outputs]]] = {}
        # Largest first: smaller graphs then reuse the shared pool's memory.
        keys = [(rows, width) for rows in reversed(row_buckets) for width in reversed(width_buckets)]
        start = time.perf_counter()
        what = "compiling and capturing" if self.cuda_graphs else "compiling"
        for i, (rows, width) in enumerate(keys):
            logger.info("%s the denoising step: bucket %d/%d (%d rows, %d pages)", what, i + 1, len(keys), rows, width)
            static = _dynamic(self._to_device(step_inputs([None] * rows, width)))
            base = self._reset_peak()
            try:
                self.buckets[rows, width] = self._capture(static)
            except Exception as exc:  # any compiler or driver failure: this bucket runs eager
                self.eager.append((rows, width))
                self.buckets[rows, width] = static, partial(self.eager_step, static)
                logger.error(
                    "%s the denoising step failed for the bucket of %d rows and %d pages, which runs eager from now "
                    "on; it had taken %.1f MiB of the device when it failed: %s: %s",
                    what, rows, width, (self._peak() - base) / 2**20, type(exc).__name__, exc,
                )  # fmt: skip
        logger.info("denoising step ready: %d buckets in %.1f s", len(keys), time.perf_counter() - start)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        """Run a step on host inputs from `step_inputs`; returns the bucket's outputs (valid until its next step)."""
        bucket = self.buckets.get(tuple(inputs["table"].shape))
        if bucket is None:  # wider than any captured bucket
            return self.compiled(_dynamic(self._to_device(inputs)))
        static, run = bucket
        for name, tensor in inputs.items():
            static[name].copy_(tensor, non_blocking=True)
        return run()

    def _reset_peak(self) -> int:
        """What the device has allocated now (CUDA; 0 elsewhere), with its peak counter reset."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: x.to(self.device, non_blocking=True) for name, x in inputs.items()}

    @torch.no_grad()  # as steps run: grad mode is part of a compiled graph's guards
    def _capture(self, static: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable[[], Outputs]]:
        """Compile for these inputs (idle rows: nothing of the engine's state changes) and, on CUDA, capture."""
        run = partial(self.compiled, static)
        if not self.cuda_graphs:
            run()
            return static, run
        stream = torch.cuda.Stream(self.device)  # warm up off the default stream, as capture requires
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        # The warm-up's blocks stay cached for its stream, where the capture cannot use them: without this the first
        # capture needs about twice the step's workspace (gpu-audit finding 3).
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()

        def replay() -> Outputs:
            graph.replay()
            return out

        return static, replay


def _dynamic(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mark the row dimension of every input and the table's width dynamic where they can be (a size-1 dimension,
    or rows when every bucket is one size, stays specialised)."""
    for tensor in inputs.values():
        if tensor.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    torch._dynamo.maybe_mark_dynamic(inputs["table"], 1)
    return inputs
