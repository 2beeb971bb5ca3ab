"""How a pass attends over the KV cache (spec 4.2-4.3, 5.2), and attention called as the reference calls it.

The model never builds masks or touches cache tensors: each pass is given an `Attend` function, which stores the new
keys and values and runs attention over cache + new slots. Its caches live with their users: the engine's paged
cache (engine/kv_cache.py, engine/attention.py), and the tests' dense one.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Attend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """q [B, heads, S, d] (None: only store k, v), k and v [B, kv, S, d] of the new slots -> [B, heads, S, d]."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scale-1.0 attention, called exactly as the reference calls SDPA (spec 9.4).

    GQA runs inside SDPA only when unmasked and d <= 256; otherwise K/V heads are repeated first. Both give the same
    math, but bit parity needs the same kernel inputs.
    """
    groups = q.shape[1] // k.shape[1]
    in_kernel = mask is None and q.shape[-1] <= 256
    if groups > 1 and not in_kernel:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=in_kernel and groups > 1)


def causal_mask(key_positions: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, S, n] bool: key valid (position >= 0), not after the query, and inside the window if sliding."""
    k, q = key_positions[:, None, None, :], query_positions[:, None, :, None]
    allowed = (k >= 0) & (k <= q)
    return allowed & (q - k < window) if window is not None else allowed
