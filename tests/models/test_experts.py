"""The experts without host syncs (issue 12, part 3): the kernel choice per device, the fallback's numerics, parity
with transformers' grouped_mm experts, batch invariance, and no syncing or data-sized op under a dispatch mode or
torch.compile(fullgraph=True)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DiffusionGemmaTextConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

from models.diffusion_gemma import Experts
from models.gemm_path import ExpertPath

NUM_EXPERTS, TOP_K, HIDDEN, WIDTH = 128, 8, 64, 32
EVERY_EXPERT = ExpertPath("every_expert", "dense")


def make_experts(
    row_alignment: int, dtype: torch.dtype = torch.float32, seed: int = 0, path: ExpertPath | None = None
) -> Experts:
    config = SimpleNamespace(num_experts=NUM_EXPERTS, moe_intermediate_size=WIDTH, hidden_size=HIDDEN)
    experts = Experts(config, row_alignment)
    if path is not None:
        experts.set_path(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * HIDDEN**-0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * WIDTH**-0.5)
    return experts.to(dtype)


def top_k_routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights and distinct expert ids [T, K], as the router's top-k gives them."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K] for _ in range(num_tokens)])
    return torch.rand(num_tokens, TOP_K, generator=gen), experts


def run(experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return experts(x, weights, ids)


EVERY_EXPERT = ExpertPath("every_expert", "dense")


ROUTINGS = {
    "top-k, most experts empty": lambda: top_k_routing(5, seed=1),
    "top-k, groups of 5-7": lambda: top_k_routing(90, seed=2),
    "one token": lambda: top_k_routing(1, seed=3),
    "every pair on one expert": lambda: (torch.rand(33, TOP_K), torch.full((33, TOP_K), 77)),
    "only the first and last expert": lambda: (torch.rand(40, TOP_K), torch.randint(0, 2, (40, TOP_K)) * 127),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("align", [1, 4])
def test_fallback_equals_grouped_mm_in_fp32(monkeypatch, routing, align):
    weights, ids = ROUTINGS[routing]()
    experts = make_experts(align)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(4))
    grouped = run(experts, x, weights, ids)
    experts.set_path(EVERY_EXPERT)
    torch.testing.assert_close(run(experts, x, weights, ids), grouped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_align_1_equals_transformers_grouped_mm_experts(dtype):
    """torch.equal: the same sort, rows and offsets as the reference's grouped_mm_experts_forward."""
    config = DiffusionGemmaTextConfig(num_experts=NUM_EXPERTS, top_k_experts=TOP_K, hidden_size=HIDDEN,
                                      moe_intermediate_size=WIDTH, hidden_activation="gelu_pytorch_tanh")  # fmt: skip
    ours = make_experts(1, dtype)
    reference = DiffusionGemmaTextExperts(config).to(dtype)
    reference.load_state_dict(ours.state_dict())
    weights, ids = top_k_routing(90, seed=5)  # 720 pairs: 5-7 rows per group, where CPU grouped_mm rounds by place
    x = torch.randn(90, HIDDEN, generator=torch.Generator().manual_seed(6)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x, weights, ids), grouped_mm_experts_forward(reference, x, ids, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_align_4_gives_a_token_the_same_output_in_any_batch(dtype):
    experts = make_experts(4, dtype)
    weights, ids = top_k_routing(200, seed=7)
    x = torch.randn(200, HIDDEN, generator=torch.Generator().manual_seed(8)).to(dtype)
    batch = run(experts, x, weights, ids)
    for t in (0, 57, 199):
        assert torch.equal(run(experts, x[t : t + 1], weights[t : t + 1], ids[t : t + 1])[0], batch[t])
    assert torch.equal(run(experts, x[40:73], weights[40:73], ids[40:73]), batch[40:73])


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bool_indexing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        if name.startswith("aten::index"):
            indices = [i for a in args if isinstance(a, (list, tuple)) for i in a if isinstance(i, torch.Tensor)]
            if any(i.dtype == torch.bool for i in indices):
                self.bool_indexing.append(name)
        return func(*args, **(kwargs or {}))


SYNCING = {"aten::nonzero", "aten::bincount", "aten::_local_scalar_dense", "aten::masked_select", "aten::item"}


def recorded_ops(experts: Experts, num_tokens: int) -> OpRecorder:
    weights, ids = top_k_routing(num_tokens, seed=9)
    x = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad(), OpRecorder() as recorder:
        experts(x, weights, ids)
    return recorder


def assert_no_sync(recorder: OpRecorder) -> None:
    syncing = [op for op in recorder.ops if op in SYNCING or op.startswith(("aten::unique", "aten::_unique"))]
    assert not syncing, syncing
    assert not recorder.bool_indexing, recorder.bool_indexing


@pytest.mark.parametrize("align", [1, 4])
def test_grouped_path_has_no_syncing_or_data_sized_ops(align):
    recorder = recorded_ops(make_experts(align), 256)
    assert recorder.ops.count("dgserve::grouped_mm") == 2
    assert_no_sync(recorder)


@pytest.mark.parametrize("align", [1, 4])
def test_fallback_has_no_syncing_or_data_sized_ops(align):
    recorder = recorded_ops(make_experts(align, path=EVERY_EXPERT), 256)
    assert "dgserve::grouped_mm" not in recorder.ops and "aten::bmm" in recorder.ops
    assert_no_sync(recorder)


@pytest.mark.parametrize("path", [ExpertPath("grouped_mm", "dense"), EVERY_EXPERT], ids=str)
def test_compiles_fullgraph(path):
    """Inductor on CPU, fullgraph=True: a graph break (item, tolist, data-sized shapes) raises."""
    torch._dynamo.reset()
    experts = make_experts(4, path=path)
    weights, ids = top_k_routing(64, seed=10)
    x = torch.randn(64, HIDDEN)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weights, ids), experts(x, weights, ids), rtol=1e-5, atol=1e-5)
