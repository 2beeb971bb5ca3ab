"""Start-up cost of the compiled denoising step by weight format and device class, on the real model's structure at a
tiny width: dynamo + AOT trace time and the aten graph's size (what inductor then compiles), and with --inductor the
inductor compile of the CPU path too. A GPU class's kernels are traced as that GPU would run them; the GEMMs without a
CPU kernel are never run: the traced graph is counted, not run (with --inductor, the cpu class's is compiled and run).

    python -m benchmarks.compile_time [--quantization none,fp8,nvfp4] [--device-class cpu,sm86,sm89,sm90] [--inductor]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from engine.config import EngineConfig
from engine.engine import Engine
from engine.graphs import StepGraphs
from models.loader import choose_kernels, load_model
from models.random_checkpoint import write_random_checkpoint


class Traced(Exception):
    """Raised instead of running the traced step."""


class AtenGraph:
    """A torch.compile backend that counts the aten graph's op nodes and runs it as traced (or hands it to inductor)."""

    def __init__(self, inductor: bool) -> None:
        self.nodes = 0
        self.backend = "inductor" if inductor else aot_autograd(fw_compiler=self._keep)

    def _keep(self, graph: torch.fx.GraphModule, example_inputs) -> object:
        self.nodes += sum(node.op == "call_function" for node in graph.graph.nodes)

        def run(*args: torch.Tensor) -> object:
            raise Traced  # measured: the trace, not a run of kernels that have no CPU implementation

        return make_boxed_func(run)


def compile_step(engine: Engine, inductor: bool) -> tuple[float, int]:
    """Seconds to compile (and run once) the one-row bucket of the step, and its aten graph's op nodes."""
    torch._dynamo.reset()
    logging.getLogger("engine.graphs").setLevel(logging.CRITICAL)  # StepGraphs reports the step it could not run
    runner, graph = engine.runner, AtenGraph(inductor)
    start = time.perf_counter()
    runner.graphs = StepGraphs(runner.step, runner.step_inputs, [1], [2], runner.device, cuda_graphs=False,
                               backend=graph.backend)  # fmt: skip
    return time.perf_counter() - start, graph.nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantization", default="none,fp8,nvfp4", help="comma list of none, fp8, nvfp4")
    parser.add_argument("--device-class", default="cpu,sm86,sm89,sm90", help="comma list (models.gemm_path)")
    parser.add_argument("--inductor", action="store_true", help="also time inductor on the cpu class (minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(directory, "structure", seed=0, dtype=torch.bfloat16)
        for scheme in (None if q == "none" else q for q in args.quantization.split(",")):
            loaded = load_model(directory, torch.bfloat16, "cpu", progress=False, expert_row_alignment=4,
                                quantization=scheme)  # fmt: skip
            for device_class in args.device_class.split(","):
                choose_kernels(loaded[0], torch.device("cpu"), torch.bfloat16, device_class)  # a bf16 model on that GPU
                config = EngineConfig(directory, device="cpu", dtype="bfloat16", max_num_seqs=1, kv_budget_bytes=2**30)
                engine = Engine(config, model=loaded)
                seconds, nodes = compile_step(engine, inductor=False)
                line = f"{scheme or 'bf16':>5} {device_class:>5}: dynamo + AOT {seconds:6.1f} s, {nodes} aten nodes"
                if args.inductor and device_class == "cpu":
                    line += f"; inductor {compile_step(engine, inductor=True)[0]:6.1f} s"
                print(f"{line}; {loaded[0].layers[0].experts.path}", flush=True)


if __name__ == "__main__":
    main()
