"""Counter-based noise: exact against a pure-Python model of the hash, uniform, and a function of the key alone."""

from __future__ import annotations

import pytest
import torch

from engine import noise

M = 0xFFFFFFFF
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    return x ^ (x >> 16)


def python_step_key(seed: int, canvas: int, step: int) -> int:
    words = (seed & M, (seed >> 32) & M, canvas & M, step & M)
    lanes = []
    for state in (0x9E3779B9, 0x7F4A7C15):
        for word in words:
            state = lowbias32(state ^ word)
        lanes.append(state)
    return ((lanes[0] & 0x7FFFFFFF) << 32) | lanes[1]


def python_bits(key: int, stream: int, count: int) -> list[int]:
    first = lowbias32((key & M) ^ ((stream + 1) * 0x9E3779B9 & M))
    second = lowbias32((key >> 32) ^ first)
    return [lowbias32(lowbias32(i ^ first) ^ second) for i in range(count)]


SEEDS = [0, 1, 2**31, 2**32 + 5, 2**63 - 1, -1, -(2**63), 123456789012345]


@pytest.mark.parametrize("device", DEVICES)
def test_the_hash_is_exact_integer_math_on_every_device(device):
    """int64 torch ops reproduce unbounded Python integers bit for bit, so CPU and CUDA draw the same numbers."""
    seeds = torch.tensor(SEEDS, device=device)
    canvas = torch.arange(len(SEEDS), device=device) * 7919
    steps = torch.arange(len(SEEDS), device=device) + 2**31
    key = noise.step_key(seeds, canvas, steps)
    expected = [python_step_key(s, c, t) for s, c, t in zip(SEEDS, canvas.tolist(), steps.tolist(), strict=True)]
    assert key.tolist() == expected
    assert all(0 <= k < 2**63 for k in expected)
    # The engine computes each step's keys on the host, from Python ints: the same keys.
    host = [noise.step_key(s, c, t) for s, c, t in zip(SEEDS, canvas.tolist(), steps.tolist(), strict=True)]
    assert host == expected
    words = noise.bits(key, noise.PROPOSAL, 300)
    assert words.tolist() == [python_bits(k, noise.PROPOSAL, 300) for k in expected]
    words = torch.randint(0, 2**32, (10_000,), generator=torch.Generator().manual_seed(0)).to(device)
    assert noise._hash32(words).tolist() == [lowbias32(w) for w in words.tolist()]


def test_keys_separate_seeds_canvases_and_steps():
    combos = [(s, c, t) for s in (0, 1, 2**32, 2**32 + 1, -1) for c in range(4) for t in range(48)]
    seed, canvas, step = (torch.tensor(column) for column in zip(*combos, strict=True))
    assert noise.step_key(seed, canvas, step).unique().numel() == len(combos)


def test_a_key_draws_the_same_numbers_in_any_batch():
    key = noise.step_key(torch.arange(16), torch.zeros(16, dtype=torch.long), torch.full((16,), 3))
    batch = noise.uniform(key, noise.PROPOSAL, (32, 3))
    for r in range(16):
        assert torch.equal(noise.uniform(key[r : r + 1], noise.PROPOSAL, (32, 3))[0], batch[r])
        assert torch.equal(noise.uniform(key[[r, 0]], noise.PROPOSAL, (32, 3))[0], batch[r])
    assert not torch.equal(batch, noise.uniform(key, noise.RENOISE, (32, 3)))  # streams differ


def test_uniforms_are_exact_24_bit_values_spread_evenly():
    key = noise.step_key(torch.arange(64), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long))
    u = noise.uniform(key, noise.PROPOSAL, (256, 3))
    assert u.shape == (64, 256, 3) and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())
    counts = torch.bincount((u.flatten() * 64).long(), minlength=64).double()
    expected = u.numel() / 64
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert torch.special.gammaincc(torch.tensor(63 / 2, dtype=torch.double), statistic / 2) > 1e-3
    # neighbouring counters and keys are uncorrelated
    flat = u.flatten().double() - 0.5
    assert abs((flat[1:] * flat[:-1]).mean()) < 4 * (1 / 12) / flat.numel() ** 0.5
    assert abs(((u[1:] - 0.5) * (u[:-1] - 0.5)).double().mean()) < 4 * (1 / 12) / flat.numel() ** 0.5


def test_random_ids_cover_the_whole_vocabulary_uniformly():
    key = noise.step_key(torch.arange(8), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    ids = noise.random_ids(key, noise.RENOISE, 4096, 64)
    assert ids.dtype == torch.long and ids.min() == 0 and ids.max() == 63
    counts = torch.bincount(ids.flatten(), minlength=64).double()
    statistic = ((counts - 512) ** 2 / 512).sum()
    assert torch.special.gammaincc(torch.tensor(63 / 2, dtype=torch.double), statistic / 2) > 1e-3
    canvas = noise.initial_canvas(key, 256, 262144)
    assert torch.equal(canvas, noise.random_ids(key, noise.INITIAL, 256, 262144))
    assert canvas.min() >= 0 and canvas.max() < 262144
