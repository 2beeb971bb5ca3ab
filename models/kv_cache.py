"""Dense KV cache for a batch of sequences that advance together (spec 4.3).

Every row holds the same number of slots; a slot whose key position is -1 is padding and never attended to.
Sliding layers keep only the most recent W-1 slots, full layers keep everything.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig


class KVCache:
    """Per-layer keys and values [B, kv, n, d] plus the absolute position of every slot written [B, L]."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.key_positions = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # [B, L], -1 = pad

    @property
    def seq_len(self) -> int:
        """Slots written so far (the full layers' length)."""
        return self.key_positions.shape[1]

    def held_positions(self, is_sliding: bool) -> torch.Tensor:
        """Key positions [B, n] of the slots a sliding or a full layer holds now."""
        held = min(self.seq_len, self.config.sliding_window - 1) if is_sliding else self.seq_len
        return self.key_positions[:, self.seq_len - held :]

    def read(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The held keys and values of a layer, or (None, None) before the first write."""
        return self.keys[layer], self.values[layer]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new slots to a layer; return held + new for this pass's attention, keep at most W-1 if sliding."""
        held_k, held_v = self.keys[layer], self.values[layer]
        if held_k is not None:
            keys, values = torch.cat([held_k, keys], dim=2), torch.cat([held_v, values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        keep = self.config.sliding_window - 1
        if self.config.layers[layer].is_sliding and keys.shape[2] > keep:
            # A copy, so that a long prefill's full-length tensor is not kept alive by a view.
            self.keys[layer], self.values[layer] = keys[:, :, -keep:].clone(), values[:, :, -keep:].clone()
        return keys, values

    def commit_positions(self, positions: torch.Tensor) -> None:
        """Record the positions [B, S] of the slots the last pass appended (-1 marks padding)."""
        self.key_positions = torch.cat([self.key_positions, positions], dim=1)
