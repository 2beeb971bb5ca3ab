"""The chunked sampler against full-vocabulary math, and the acceptance rule and schedule on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import _draw, _proposal_chunk_mass, accept_mask, fast_step, schedule_temperature
from models.loader import load_model


@pytest.fixture(scope="module")
def model(engine):
    return engine.model


def hidden_rows(model, rows: int, scale: float, seed: int) -> torch.Tensor:
    # An offset seed: the checkpoint's embedding came from seed 0's stream, and rows equal to it would put every
    # argmax in the first vocabulary chunk.
    gen = torch.Generator().manual_seed(1000 + seed)
    h = torch.randn(rows, model.config.canvas_length, model.config.hidden_size, generator=gen)
    return h / h.norm(dim=-1, keepdim=True) * scale


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.bfloat16)[0]


# Peaked and flat fp32 rows (a flat row's max moves between chunks), and bf16 weights (the GPU default), whose chunk
# GEMM rounds to bf16 before the fp32 softcap as logits() does; soft embeddings then agree to a bf16 ulp.
@pytest.mark.parametrize(
    ("weights", "scale", "soft_rtol", "soft_atol"),
    [("fp32", 40.0, 1e-5, 1e-5), ("fp32", 3.0, 1e-5, 1e-5), ("bf16", 3.0, 1.6e-2, 1e-4)],
)
def test_streaming_pass_equals_full_vocabulary_math(request, weights, scale, soft_rtol, soft_atol):
    model = request.getfixturevalue("model" if weights == "fp32" else "bf16_model")
    dtype = model.embed_tokens.weight.dtype
    hidden = hidden_rows(model, 2, scale=scale, seed=0).to(dtype)
    temperature = torch.tensor([0.8, 0.5])
    canvas = torch.zeros(2, model.config.canvas_length, dtype=torch.long)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    result = fast_step(model, hidden, canvas, temperature, [1.0, 1.0], torch.tensor([0.1, 0.1]), gens, 300)
    zt = model.logits(hidden) / temperature[:, None, None]  # [2, C, V]: fine at this vocabulary size
    entropy = torch.distributions.Categorical(logits=zt).entropy()
    assert torch.equal(result.argmax, zt.argmax(-1))  # bf16 ties included: both keep the first index
    torch.testing.assert_close(result.mean_entropy, entropy.mean(-1), rtol=0, atol=1e-5)
    assert result.soft_embeds.dtype == dtype
    torch.testing.assert_close(result.soft_embeds, model.sc_embedding(zt), rtol=soft_rtol, atol=soft_atol)


def test_temperature_zero_proposes_the_argmax(model):
    hidden = hidden_rows(model, 1, scale=60.0, seed=1)
    canvas = torch.zeros(1, model.config.canvas_length, dtype=torch.long)
    result = fast_step(model, hidden, canvas, torch.tensor([0.8]), [0.0], torch.tensor([5.0]), [torch.Generator()], 512)
    entropy = torch.distributions.Categorical(logits=model.logits(hidden) / 0.8).entropy()
    accepted = accept_mask(entropy, torch.tensor([5.0]))
    assert accepted.any()
    assert torch.equal(result.canvas[accepted], result.argmax[accepted])


def test_chunk_mass_at_any_proposal_factor():
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(2, 8, 64, generator=gen) * 3  # [R, C, Vc]
    row_max = zt.amax(-1).view(-1) + torch.rand(16, generator=gen)  # the running max may exceed this chunk's
    d = zt - row_max.view(2, 8, 1)
    mass = _proposal_chunk_mass(d, row_max, d.exp().sum(-1).view(-1), [1.0, 0.5])
    expected = torch.stack([torch.logsumexp(zt[0], -1), torch.logsumexp(zt[1] / 0.5, -1)]).view(-1)
    torch.testing.assert_close(mass, expected)


def test_hierarchical_draw_samples_the_softmax(model):
    """Every position of a repeated hidden row is an independent draw; frequencies match softmax within 4 sigma."""
    length = model.config.canvas_length
    e = torch.nn.functional.normalize(model.embed_tokens.weight[[10, 20, 30]], dim=-1)
    row = (110 * e[0] + 100 * e[1] + 90 * e[2])[None].expand(length, -1)  # mass on a few tokens
    temperature = torch.tensor(0.7)
    probs = torch.softmax(model.logits(row[:1]) / temperature, dim=-1)[0]
    chunk = 256
    mass = torch.stack(
        [torch.logsumexp(model.logits(row, s, s + chunk) / temperature, -1) for s in range(0, probs.numel(), chunk)],
        dim=-1,
    )
    gen = torch.Generator().manual_seed(3)
    draws = torch.cat([_draw(model, row, mass, temperature, gen, chunk) for _ in range(40)])
    counts = torch.bincount(draws, minlength=probs.numel()).float()
    n = draws.numel()
    top = probs.topk(8)
    assert top.values.sum() > 0.3  # a peaked distribution, so the test has power
    for p, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        assert abs(counts[token] / n - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, token


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
