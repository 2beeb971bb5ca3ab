"""Counter-based noise for the fast sampler: every random number is a pure function of (key, stream, counter).

A row draws the same numbers alone, in any batch and on any device, without generator state, host syncs or
data-dependent shapes, so the sampler that uses it can be compiled and captured in a CUDA graph.

The mixer is Chris Wellons' lowbias32 (hash-prospector), a bijection of 32-bit words with low avalanche bias, done in
int64 torch ops: values stay in [0, 2**32) and no product reaches 2**63 (a constant >= 2**31 is split off, see
`_mul32`), so results are exact and identical on every backend. A key is 63 bits, the seed's two halves, the canvas
index and the step absorbed into two independent 32-bit lanes. Each number hashes its counter twice, with one word
derived from each key half and the stream: two streams or keys overlap only if both words agree.

Streams, each counted from 0 per key:
    INITIAL   [C] a new canvas's ids (the key of its step 0)
    RENOISE   [C] the ids given to positions a step does not accept
    PROPOSAL  [C, 3] per position the uniforms that pick the proposal's vocabulary chunk, the block inside a chunk and
              the token inside a block (see engine/sampler.py)
"""

from __future__ import annotations

import math

import torch

INITIAL, RENOISE, PROPOSAL = range(3)

MASK32 = 0xFFFFFFFF
_LANES = (0x9E3779B9, 0x7F4A7C15)  # distinct starting states for the key's two halves
_GOLDEN = 0x9E3779B9  # spreads stream ids over 32-bit words


Word = int | torch.Tensor  # int64 words: the hash is the same integer arithmetic on Python ints and tensors


def _mul32(x: Word, c: int) -> Word:
    """x * c mod 2**32 for words x in [0, 2**32): with c >= 2**31, x * 2**31 mod 2**32 is (x & 1) << 31."""
    if c < 2**31:
        return (x * c) & MASK32
    return (x * (c - 2**31) + ((x & 1) << 31)) & MASK32


def _hash32(x: Word) -> Word:
    """lowbias32 of int64 words in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def step_key(seed: Word, canvas_index: Word, step: Word) -> Word:
    """A key in [0, 2**63) from a seed (any 64-bit value), a canvas index and a step (mod 2**32): Python ints (as the
    engine computes a step's keys on the host), or [R] int64 tensors, with the same values."""
    words = (seed & MASK32, (seed >> 32) & MASK32, canvas_index & MASK32, step & MASK32)
    lanes = []
    for state in _LANES:
        lane = state
        for word in words:
            lane = _hash32(lane ^ word)
        lanes.append(lane)
    high, low = lanes
    return ((high & 0x7FFFFFFF) << 32) | low


def bits(key: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """[R, count] int64 words in [0, 2**32): counters 0 .. count - 1 of each key's stream."""
    first = _hash32((key & MASK32) ^ ((stream + 1) * _GOLDEN & MASK32))
    second = _hash32((key >> 32) ^ first)
    counter = torch.arange(count, device=key.device)
    return _hash32(_hash32(counter ^ first[:, None]) ^ second[:, None])


def uniform(key: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[R, *shape] fp32 in [0, 1): the top 24 bits of each word, so every value is exact."""
    words = bits(key, stream, math.prod(shape))
    return ((words >> 8).float() * 2.0**-24).view(-1, *shape)


def random_ids(key: torch.Tensor, stream: int, length: int, vocab: int) -> torch.Tensor:
    """[R, length] int64 ids in [0, vocab) by multiply-shift: exactly uniform when vocab is a power of two (the real
    262,144), otherwise biased by under vocab / 2**32."""
    return (bits(key, stream, length) * vocab) >> 32


def initial_canvas(key: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
    """[R, length] uniform ids over the whole vocabulary, specials included (spec P14)."""
    return random_ids(key, INITIAL, length, vocab)
