"""The chunked sampler against full-vocabulary math and softmax statistics, its batch invariance and graph-safety, and
the acceptance rule and schedule on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import noise
from engine.reference_runner import schedule_temperature
from engine.sampler import accept_mask, fast_step
from models.loader import load_model

ACCEPT_ALL = float("inf")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, progress=False)[0]


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.bfloat16, progress=False)[0]


def hidden_rows(model, rows: int, scale: float, seed: int) -> torch.Tensor:
    # An offset seed: the checkpoint's embedding came from seed 0's stream, and rows equal to it would put every
    # argmax in the first vocabulary chunk.
    gen = torch.Generator().manual_seed(1000 + seed)
    h = torch.randn(rows, model.config.canvas_length, model.config.hidden_size, generator=gen)
    return h / h.norm(dim=-1, keepdim=True) * scale


def keys(rows: int, seed: int = 0, step: int = 0) -> torch.Tensor:
    seeds = torch.arange(seed, seed + rows)
    return noise.step_key(seeds, torch.zeros(rows, dtype=torch.long), torch.full((rows,), step))


def unpinned(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


def row_inputs(rows: int, temperature, factor, bound) -> dict[str, torch.Tensor]:
    """The sampler's per-row inputs: schedule temperature, temperature factor and entropy bound, per row or for all."""
    values = {"schedule_temperature": temperature, "temperature": factor, "entropy_bound": bound}
    return {name: torch.as_tensor(v, dtype=torch.float32).expand(rows).contiguous() for name, v in values.items()}


def step(model, hidden, temperature, factor, bound, key, vocab_chunk=300):
    """fast_step with per-row factors and a temperature and bound per row or for all; it pays for scaled proposals
    only when a factor needs them."""
    scaled = any(f not in (0.0, 1.0) for f in factor)
    rows = hidden.shape[0]
    return fast_step(
        model, hidden, row_inputs(rows, temperature, factor, bound), key, unpinned(hidden), vocab_chunk, scaled
    )


# Peaked and flat fp32 rows (a flat row's max moves between chunks), and bf16 weights (the GPU default), whose chunk
# GEMM rounds to bf16 before the fp32 softcap as logits() does; soft embeddings then agree to a bf16 ulp. Scaled
# proposals must not change any of it. 300 splits the vocabulary into uneven chunks with blocks of 60 and 62 ids.
@pytest.mark.parametrize(
    ("weights", "scale", "factor", "soft_rtol", "soft_atol"),
    [
        ("fp32", 40.0, [1.0, 1.0], 1e-5, 1e-5),
        ("fp32", 3.0, [1.0, 0.5], 1e-5, 1e-5),
        ("bf16", 3.0, [1.0, 1.0], 1.6e-2, 1e-4),
        ("bf16", 40.0, [0.0, 2.0], 1.6e-2, 1e-4),
    ],
)
def test_streaming_pass_equals_full_vocabulary_math(request, weights, scale, factor, soft_rtol, soft_atol):
    model = request.getfixturevalue("model" if weights == "fp32" else "bf16_model")
    dtype = model.embed_tokens.weight.dtype
    hidden = hidden_rows(model, 2, scale=scale, seed=0).to(dtype)
    result = step(model, hidden, [0.8, 0.5], factor, 0.1, keys(2))
    zt = model.logits(hidden) / torch.tensor([0.8, 0.5])[:, None, None]  # [2, C, V]: fine at this vocabulary size
    entropy = torch.distributions.Categorical(logits=zt).entropy()
    assert torch.equal(result.argmax, zt.argmax(-1))  # bf16 ties included: both keep the first index
    torch.testing.assert_close(result.mean_entropy, entropy.mean(-1), rtol=0, atol=1e-5)
    assert result.soft_embeds.dtype == dtype
    torch.testing.assert_close(result.soft_embeds, model.sc_embedding(zt), rtol=soft_rtol, atol=soft_atol)


class TableModel(torch.nn.Module):
    """What fast_step reads of a model, with fixed shifted logits table [R * C, V] >= 0 (hidden is ignored)."""

    def __init__(self, table: torch.Tensor, width: int = 8) -> None:
        super().__init__()
        self.table = table
        self.embed_tokens = torch.nn.Embedding(table.shape[1], width)
        self.register_buffer("embed_scale", torch.tensor(1.0))

    def shifted_logits(self, hidden, start, end, scale, out):
        return out.copy_(self.table[:, start:end]).mul_(scale)


def test_argmax_keeps_the_first_index_across_blocks_and_chunks():
    table = torch.rand(4, 1024, generator=torch.Generator().manual_seed(0)) * 5
    table[0, [100, 101, 700]] = 9.0  # inside a block and in a later chunk
    table[1, [63, 64]] = 9.0  # the last id of a block and the first of the next
    table[2, [512, 513, 1000]] = 9.0  # the first ids of the second chunk
    table[3, 1023] = 9.0  # the very last id
    result = fast_step(
        TableModel(table),
        torch.zeros(1, 4, 8),
        row_inputs(1, 1.0, 1.0, 1.0),
        keys(1),
        torch.zeros(1, 4, dtype=torch.bool),
        vocab_chunk=512,
        scaled_proposals=False,
    )
    assert result.argmax[0].tolist() == [100, 63, 512, 1023]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 10.0) -> float:
    """Pearson's test of counts [V] against probs [V]; ids expected fewer than min_expected times share one bin."""
    expected = probs.double() * counts.sum()
    own = expected >= min_expected
    observed = torch.cat([counts[own].double(), counts[~own].double().sum()[None]])
    expected = torch.cat([expected[own], expected[~own].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(observed.numel() - 1, dtype=torch.double)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


# The same hidden row at every position of 16 rows, 16 keys: 8,192 independent proposals per case.
@pytest.mark.parametrize(
    ("temperature", "factor", "vocab_chunk"), [(0.8, 1.0, 256), (0.5, 1.0, 300), (0.8, 0.5, 256), (0.4, 2.0, 300)]
)
def test_proposals_follow_the_softmax(model, temperature, factor, vocab_chunk):
    rows, length = 16, model.config.canvas_length
    row = hidden_rows(model, 1, scale=100.0, seed=2)[0, :1]  # [1, H]: 3-5 nats of entropy spread over every chunk
    hidden = row.expand(rows, length, -1)
    vocab = model.config.vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    for k in range(16):
        result = step(model, hidden, temperature, [factor] * rows, ACCEPT_ALL, keys(rows, seed=rows * k), vocab_chunk)
        counts += torch.bincount(result.canvas.flatten(), minlength=vocab)
    logits = model.logits(row)[0].double()
    probs = torch.softmax(logits / (temperature * factor), -1)
    assert probs.view(8, -1).sum(-1).min() > 0.01  # every chunk matters
    assert chi_square_p_value(counts, probs) > 1e-3
    # The test has power: 10 % off in temperature fails it.
    assert chi_square_p_value(counts, torch.softmax(logits / (1.1 * temperature * factor), -1)) < 1e-6


def test_factor_zero_proposes_the_argmax(model):
    hidden = hidden_rows(model, 4, scale=60.0, seed=1)
    for factor in ([0.0, 1.0, 0.0, 1.0], [0.0, 0.5, 0.0, 2.0]):  # with and without the scaled pass
        result = step(model, hidden, 0.8, factor, ACCEPT_ALL, keys(4))
        assert torch.equal(result.canvas[0::2], result.argmax[0::2])
        assert not torch.equal(result.canvas[1::2], result.argmax[1::2])
        assert torch.isfinite(result.soft_embeds).all() and torch.isfinite(result.mean_entropy).all()


def test_rejected_positions_are_renoised_from_the_key(model):
    hidden = hidden_rows(model, 2, scale=40.0, seed=3)
    key = keys(2, seed=5)
    result = step(model, hidden, 0.6, [1.0, 1.0], 0.0, key)  # bound 0: only the lowest-entropy position
    zt = model.logits(hidden) / 0.6
    accepted = accept_mask(torch.distributions.Categorical(logits=zt).entropy(), torch.tensor([0.0, 0.0]))
    assert accepted.sum(-1).tolist() == [1, 1]
    renoise = noise.random_ids(key, noise.RENOISE, model.config.canvas_length, model.config.vocab_size)
    assert torch.equal(result.canvas[~accepted], renoise[~accepted])


def test_a_row_is_bit_identical_alone_and_in_any_batch(model):
    rows = 16
    hidden = hidden_rows(model, rows, scale=30.0, seed=4)
    temperature = torch.linspace(0.4, 0.8, rows)
    factor = torch.tensor([1.0, 0.5, 0.0, 2.0] * 4)
    bound = torch.tensor([0.1, 1.0, 5.0, ACCEPT_ALL] * 4)
    key = keys(rows, seed=7, step=3)

    def run(sl: slice):
        scaled = any(f not in (0.0, 1.0) for f in factor[sl].tolist())
        h = hidden[sl]
        inputs = row_inputs(h.shape[0], temperature[sl], factor[sl], bound[sl])
        return fast_step(model, h, inputs, key[sl], unpinned(h), 256, scaled)

    alone = [run(slice(r, r + 1)) for r in range(rows)]
    for batch in (2, 4, 8, 16):
        for first in range(0, rows, batch):
            together = run(slice(first, first + batch))
            for i in range(batch):
                for field in ("canvas", "argmax", "mean_entropy", "soft_embeds"):
                    assert torch.equal(getattr(together, field)[i], getattr(alone[first + i], field)[0]), (batch, field)


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bool_indexing = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        if func.name().startswith(("aten::index", "aten::_index_put")):
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            self.bool_indexing |= any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat)
        return func(*args, **(kwargs or {}))


SYNCING_OR_DATA_SIZED = (
    "aten::nonzero",
    "aten::unique",
    "aten::_unique",
    "aten::bincount",
    "aten::multinomial",
    "aten::_local_scalar_dense",
    "aten::masked_select",
    "aten::item",
    "aten::is_nonzero",
)


@pytest.mark.parametrize("scaled", [False, True])
def test_the_step_has_no_syncs_and_no_per_row_work(model, scaled):
    counts = []
    for rows in (1, 16):
        hidden = hidden_rows(model, rows, scale=30.0, seed=5)
        factor = torch.full((rows,), 0.5 if scaled else 1.0)
        inputs, recorder = row_inputs(rows, 0.6, factor, 0.1), OpRecorder()
        with recorder:
            pins = unpinned(hidden)
            fast_step(model, hidden, inputs, keys(rows), pins, 512, scaled)
        forbidden = [op for op in recorder.ops if op.startswith(SYNCING_OR_DATA_SIZED)]
        assert not forbidden and not recorder.bool_indexing
        counts.append(len(recorder.ops))
    assert counts[0] == counts[1]


def test_the_step_compiles_as_one_graph(model):
    torch._dynamo.reset()
    compiled = torch.compile(fast_step, fullgraph=True, backend="aot_eager")
    hidden = hidden_rows(model, 2, scale=30.0, seed=6)
    args = (row_inputs(2, [0.8, 0.5], [1.0, 0.5], [0.1, ACCEPT_ALL]), keys(2), unpinned(hidden))
    eager = fast_step(model, hidden, *args, 1024, True)
    graph = compiled(model, hidden, *args, 1024, True)
    assert torch.equal(graph.canvas, eager.canvas) and torch.equal(graph.argmax, eager.argmax)
    torch.testing.assert_close(graph.mean_entropy, eager.mean_entropy)
    torch.testing.assert_close(graph.soft_embeds, eager.soft_embeds)


def test_the_accelerator_soft_embedding_gemm_traces(tiny_checkpoint):
    """Off CPU, bf16 weights take a bf16 GEMM with fp32 output: on the meta device that branch runs shape-checked."""
    model = load_model(tiny_checkpoint, torch.bfloat16, progress=False)[0].to("meta")
    length, width = model.config.canvas_length, model.config.hidden_size
    hidden = torch.empty(2, length, width, dtype=torch.bfloat16, device="meta")
    meta = {"device": "meta"}
    result = fast_step(
        model,
        hidden,
        {name: x.to("meta") for name, x in row_inputs(2, 0.8, 0.5, 0.1).items()},
        torch.zeros(2, dtype=torch.long, **meta),
        torch.zeros(2, length, dtype=torch.bool, **meta),
        512,
        True,
    )
    assert result.soft_embeds.shape == (2, length, width) and result.soft_embeds.dtype == torch.bfloat16
    assert result.canvas.shape == (2, length) and result.canvas.dtype == torch.long


def test_acceptance_keeps_the_lowest_entropy_prefix_within_the_bound():
    entropy = torch.tensor([[0.5, 0.01, 0.2, 0.3], [0.05, 0.01, 0.2, 0.03]])
    # row 0: sorted 0.01, 0.2, 0.3, 0.5 -> sums before each: 0, 0.01, 0.21, 0.51 -> the 0.01 and 0.2 slots
    # row 1: sorted 0.01, 0.03, 0.05, 0.2 -> 0, 0.01, 0.04, 0.09 -> all
    assert accept_mask(entropy, torch.tensor([0.1, 0.1])).tolist() == [[False, True, True, False], [True] * 4]
    assert accept_mask(torch.tensor([[9.0, 8.0]]), torch.tensor([0.1])).tolist() == [[False, True]]


def test_temperature_schedule_uses_steps_remaining():
    assert schedule_temperature(48, 0.4, 0.8, 48).item() == pytest.approx(0.8)
    assert schedule_temperature(24, 0.4, 0.8, 48).item() == pytest.approx(0.6)
    assert schedule_temperature(1, 0.4, 0.8, 48).item() == pytest.approx(0.4 + 0.4 / 48)
    assert schedule_temperature(1, 0.4, 0.8, 48).dtype == torch.float32
