"""The compiled denoising step (engine/graphs.py): fullgraph on the real model's structure with nothing a CUDA graph
cannot capture, the eager step's tokens bit for bit, and a bounded number of compiles over continuous batching.

The step is traced through AOT autograd to the aten graph that inductor would compile, and that graph is run as
traced, so its numbers are the eager ops' numbers: any divergence in tokens is a tracing bug, not rounding.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from benchmarks.step_ops import SYNCING
from engine.config import EngineConfig
from engine.engine import Engine
from engine.graphs import StepGraphs
from engine.model_runner import row_buckets
from engine.request import BlockCommitted, Request, SamplingParams
from models.random_checkpoint import write_random_checkpoint

# Ops that read or advance a generator: the step's noise must be counter-based, the same in a graph replay.
RANDOM = {"aten::rand", "aten::randn", "aten::randint", "aten::multinomial", "aten::bernoulli", "aten::normal"}


class AtenGraphs:
    """A torch.compile backend that keeps each compiled aten graph and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.backend = aot_autograd(fw_compiler=self._keep)

    def _keep(self, graph: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(graph)
        return make_boxed_func(graph.forward)

    def __call__(self, graph: torch.fx.GraphModule, example_inputs) -> object:
        return self.backend(graph, example_inputs)


def compiled(engine: Engine, widths: list[int]) -> AtenGraphs:
    """Give the engine a compiled step traced by AtenGraphs (CUDA graphs asked for: on CPU they are skipped)."""
    runner, graphs = engine.runner, AtenGraphs()
    runner.graphs = StepGraphs(runner.step, runner.step_inputs, row_buckets(engine.config.max_num_seqs), widths,
                               runner.device, cuda_graphs=True, backend=graphs)  # fmt: skip
    return graphs


def op_names(graph: torch.fx.GraphModule) -> set[str]:
    return {n.target._schema.name for n in graph.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}


def test_the_step_compiles_as_one_graph_per_row_specialisation_with_nothing_a_cuda_graph_cannot_capture(tmp_path):
    checkpoint = write_random_checkpoint(tmp_path, "structure", dtype=torch.bfloat16)
    engine = Engine(EngineConfig(str(checkpoint), device="cpu", dtype="float32", max_num_seqs=2,
                                 kv_budget_bytes=2**30, vocab_chunk=65536))  # fmt: skip
    graphs = compiled(engine, widths=[2])  # fullgraph=True: a graph break raises here
    assert len(graphs.graphs) == 2  # one row, and every other bucket with symbolic rows and pages
    for graph in graphs.graphs:
        names = op_names(graph)
        assert not names & (SYNCING | RANDOM), names & (SYNCING | RANDOM)
        unbacked = [n for n in graph.graph.nodes if free_unbacked_symbols(n.meta.get("val"))]
        assert not unbacked, f"shapes from data: {unbacked[:5]}"
        # The KV pool is written by one opaque in-place op per layer, never copied whole by functionalisation.
        stores = [n for n in graph.graph.nodes if "store_kv" in str(n.args[0] if n.args else "")]
        assert len(stores) == engine.model_config.num_layers


def drive(engine: Engine, plan: list[tuple[int, str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Add each request at its step, as a server would between iterations; returns each request's tokens."""
    tokens: dict[str, list[int]] = {request_id: [] for _, request_id, _, _ in plan}
    step = 0
    while step <= max(at for at, *_ in plan) or engine.has_unfinished():
        for at, request_id, prompt, params in plan:
            if at == step:
                engine.add_request(Request(request_id, tuple(prompt), params))
        for event in engine.step()[0]:
            if isinstance(event, BlockCommitted):
                tokens[event.request_id].extend(event.token_ids)
        step += 1
    return tokens


@pytest.mark.parametrize("seed", [0])
def test_compiled_steps_give_the_eager_tokens_and_compile_at_most_once_per_row_bucket(tiny_checkpoint, seed):
    rng = random.Random(seed)
    plan = [
        (
            rng.randrange(12),
            f"r{i}",
            [rng.randrange(3, 200) for _ in range(rng.randrange(1, 40))],
            SamplingParams(
                max_tokens=rng.choice([20, 70, 130]),
                steps=rng.randrange(2, 5),
                temperature=rng.choice([0.0, 0.5, 1.0, 1.5]),
                seed=rng.randrange(2**31),
            ),
        )
        for i in range(6)
    ]

    def engine() -> Engine:
        return Engine(EngineConfig(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=4,
                                   kv_budget_bytes=64 * 2**20))  # fmt: skip

    eager = drive(engine(), plan)
    fast = engine()
    graphs = compiled(fast, widths=[2])  # wider tables (tiny pages hold 32 tokens): compiled, not captured
    assert drive(fast, plan) == eager
    assert all(eager.values())
    assert len(graphs.graphs) <= len(row_buckets(4))


def test_compile_is_on_by_default_on_cuda_only_and_never_in_reference_mode():
    assert not EngineConfig("x", device="cpu").compiled
    assert EngineConfig("x", device="cuda").compiled
    assert not EngineConfig("x", device="cuda", reference_mode=True, max_num_seqs=1).compiled
    assert EngineConfig("x", device="cpu", compile=True).compiled
    with pytest.raises(ValueError, match="reference_mode"):
        EngineConfig("x", reference_mode=True, max_num_seqs=1, compile=True)


def test_a_bucket_whose_capture_fails_is_logged_as_an_error_and_runs_eager(tiny_checkpoint, caplog, monkeypatch):
    def engine() -> Engine:
        return Engine(EngineConfig(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=1,
                                   kv_budget_bytes=64 * 2**20))  # fmt: skip

    def out_of_memory(self, static):  # the capture's allocation fails, before anything is compiled
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(StepGraphs, "_capture", out_of_memory)
    fast = engine()
    runner = fast.runner
    with caplog.at_level(logging.ERROR, logger="engine.graphs"):
        runner.graphs = StepGraphs(runner.step, runner.step_inputs, [1], [2], runner.device, cuda_graphs=True)
    assert runner.graphs.eager == [(1, 2)] and runner.eager_buckets == ("1x2",)
    (record,) = caplog.records
    assert "bucket of 1 rows and 2 pages" in record.message and "Tried to allocate 3.00 GiB" in record.message
    plan = [(0, "alone", [5, 6, 7], SamplingParams(max_tokens=20, steps=3, seed=1))]
    assert drive(fast, plan) == drive(engine(), plan)  # the bucket ran, eager
