"""The dense batch cache of the reference layout (spec 4.2-4.3, 5.2): rows in lockstep like transformers'
DynamicCache, for parity tests that run the model without the engine."""

from __future__ import annotations

import torch

from models.attend import Attend, causal_mask, sdpa
from models.config import ModelConfig


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
