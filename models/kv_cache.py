"""How a pass attends over the KV cache, and the dense batch cache the reference layout uses (spec 4.2-4.3, 5.2).

The model never builds masks or touches cache tensors: each pass asks its cache for an `Attend` function, which
stores the new keys and values (encoder passes only) and runs attention over cache + new slots. This dense cache
keeps rows in lockstep like transformers' DynamicCache; the engine has its own per-sequence layout.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from models.config import ModelConfig


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


class KVCache:
    """Rows in lockstep: per-layer keys and values [B, kv, n, d] and every slot's absolute position [B, L]."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.key_positions = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # [B, L], -1 = pad

    @property
    def seq_len(self) -> int:
        return self.key_positions.shape[1]

    def _held_positions(self, is_sliding: bool) -> torch.Tensor:
        """Positions [B, n] of the slots a layer holds: all for full layers, the last W-1 for sliding ones."""
        held = min(self.seq_len, self.config.sliding_window - 1) if is_sliding else self.seq_len
        return self.key_positions[:, self.seq_len - held :]

    def _cat(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held_k, held_v = self.keys[layer], self.values[layer]
        if held_k is None:
            return k, v
        return torch.cat([held_k, k], dim=2), torch.cat([held_v, v], dim=2)

    def encoder_attention(self, positions: torch.Tensor, is_pad: torch.Tensor) -> Attend:
        """Causal attention for new slots at positions [B, S]; pad slots are stored but never attended to."""
        new_positions = positions.masked_fill(is_pad, -1)
        window = self.config.sliding_window
        masks = {
            sliding: causal_mask(
                torch.cat([self._held_positions(sliding), new_positions], 1), positions, window if sliding else None
            )
            for sliding in (False, True)
        }
        self.key_positions = torch.cat([self.key_positions, new_positions], dim=1)

        def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
            k, v = self._cat(layer, k, v)
            self.keys[layer], self.values[layer] = k, v
            if self.config.layers[layer].is_sliding and k.shape[2] > window - 1:
                # Keep W-1 slots (spec 4.3); a copy, so a long prefill's full tensor is not kept alive by a view.
                self.keys[layer], self.values[layer] = k[:, :, 1 - window :].clone(), v[:, :, 1 - window :].clone()
            return None if q is None else sdpa(q, k, v, masks[self.config.layers[layer].is_sliding])

        return attend

    def decoder_attention(self, canvas_length: int) -> Attend:
        """Bidirectional attention of a canvas over the held slots plus itself; never writes (spec 5, step 3)."""
        masks = {}
        for sliding in (False, True):
            valid = self._held_positions(sliding) >= 0  # [B, n]
            b = valid.shape[0]
            # No mask when nothing is padded, as generate() does: bit parity needs the unmasked SDPA call.
            masks[sliding] = (
                None
                if bool(valid.all())
                else torch.cat([valid, valid.new_ones(b, canvas_length)], 1)[:, None, None, :].expand(
                    b, 1, canvas_length, -1
                )
            )

        def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
            k, v = self._cat(layer, k, v)
            return sdpa(q, k, v, masks[self.config.layers[layer].is_sliding])

        return attend
