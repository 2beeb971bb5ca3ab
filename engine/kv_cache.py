"""Per-sequence KV memory and the attention each batched pass runs over it (spec 4.2-4.3, 5).

Each sequence owns its cache, so attention runs sequence by sequence over exactly that sequence's keys: no padding
enters a softmax, and a sequence's numbers do not depend on what else is in the batch. Full layers live in one
buffer sized at admission (prefix + the canvas being denoised); sliding layers keep the last W-1 slots.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig
from models.kv_cache import Attend, causal_mask, sdpa


class SequenceKV:
    """One sequence's cache. Slots [0, length) are committed; full-layer slots past that are canvas scratch."""

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.length, self.capacity = config, 0, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for g in config.layers:
            shape = (g.num_kv_heads, 0 if g.is_sliding else capacity, g.head_dim)
            self.keys.append(torch.empty(shape, device=device, dtype=dtype))
            self.values.append(torch.empty(shape, device=device, dtype=dtype))

    @staticmethod
    def num_bytes(config: ModelConfig, capacity: int, dtype: torch.dtype) -> int:
        """What a sequence of this capacity holds at most (K and V, all layers)."""
        element = torch.empty((), dtype=dtype).element_size()
        slots = [min(capacity, config.sliding_window - 1) if g.is_sliding else capacity for g in config.layers]
        return sum(2 * g.num_kv_heads * g.head_dim * n * element for g, n in zip(config.layers, slots, strict=True))

    def with_new(self, layer: int, k: torch.Tensor, v: torch.Tensor, commit: bool) -> tuple[torch.Tensor, ...]:
        """Keys and values [kv, length + n, d] = held slots + the new ones; `commit` keeps them for later passes."""
        n = k.shape[1]
        if not self.config.layers[layer].is_sliding:
            if self.length + n > self.capacity:
                raise RuntimeError(f"sequence KV capacity {self.capacity} exceeded")
            # Canvas K/V go to the scratch tail too: no copy of the prefix per denoising step.
            self.keys[layer][:, self.length : self.length + n] = k
            self.values[layer][:, self.length : self.length + n] = v
            return self.keys[layer][:, : self.length + n], self.values[layer][:, : self.length + n]
        keys, values = torch.cat([self.keys[layer], k], dim=1), torch.cat([self.values[layer], v], dim=1)
        if commit:
            keep = self.config.sliding_window - 1
            self.keys[layer], self.values[layer] = keys[:, -keep:].clone(), values[:, -keep:].clone()
        return keys, values


class KVBudget:
    """Byte accounting of all sequences' KV memory against the budget fixed at start."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes, self.used_bytes = total_bytes, 0

    def can_allocate(self, num_bytes: int) -> bool:
        return self.used_bytes + num_bytes <= self.total_bytes

    def allocate(self, num_bytes: int) -> None:
        if not self.can_allocate(num_bytes):
            raise RuntimeError("KV budget exceeded")
        self.used_bytes += num_bytes

    def free(self, num_bytes: int) -> None:
        self.used_bytes -= num_bytes


def encoder_attention(sequences: list[SequenceKV], starts: list[int], lengths: list[int]) -> Attend:
    """Causal attention for a flattened batch [1, T]: sequence i's new tokens are [starts[i], starts[i] + lengths[i]).

    Tokens outside every segment are alignment padding: not stored, output zero. Call `commit_encoded` afterwards.
    """
    config = sequences[0].config
    masks = []
    for seq, n in zip(sequences, lengths, strict=True):
        queries = torch.arange(seq.length, seq.length + n, device=seq.keys[0].device)[None]
        held_sliding = min(seq.length, config.sliding_window - 1)
        masks.append(
            {
                False: causal_mask(torch.arange(seq.length + n, device=queries.device)[None], queries, None),
                True: causal_mask(
                    torch.arange(seq.length - held_sliding, seq.length + n, device=queries.device)[None],
                    queries,
                    config.sliding_window,
                ),
            }
        )

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        out = None if q is None else torch.zeros_like(q)
        sliding = config.layers[layer].is_sliding
        for seq, mask, start, n in zip(sequences, masks, starts, lengths, strict=True):
            keys, values = seq.with_new(layer, k[0, :, start : start + n], v[0, :, start : start + n], commit=True)
            if out is not None:
                out[:, :, start : start + n] = sdpa(q[:, :, start : start + n], keys[None], values[None], mask[sliding])
        return out

    return attend


def commit_encoded(sequences: list[SequenceKV], lengths: list[int]) -> None:
    """Advance each sequence past the tokens an encoder pass just stored."""
    for seq, n in zip(sequences, lengths, strict=True):
        seq.length += n


def decoder_attention(sequences: list[SequenceKV]) -> Attend:
    """Bidirectional attention of canvas row i [C] over sequence i's held slots plus the canvas; writes nothing."""

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        rows = []
        for i, seq in enumerate(sequences):
            keys, values = seq.with_new(layer, k[i], v[i], commit=False)
            rows.append(sdpa(q[i : i + 1], keys[None], values[None], None))
        return torch.cat(rows)

    return attend
