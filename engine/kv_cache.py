"""All sequences' KV memory, allocated once, and the attention each pass runs over it (spec 4.2-4.3, 5).

Full layers keep every committed token in a pool of pages of `page_size` tokens, shared by all sequences through
per-sequence page lists (whole committed canvases are whole pages, which is what prefix sharing will reuse). Page 0
is never handed out: table entries past a sequence's pages point at it, and rows that are not denoising write their
canvas there. Sliding layers keep, per sequence slot, a ring of the last W-1 tokens (position p at p mod (W-1))
followed by the canvas being denoised, so a step writes in place and never concatenates.

The denoising step is one masked attention call per layer over every row of a bucket of slots: a row's valid keys
sit at the same indices whatever else is in the batch (prefix, then canvas, for full layers), and CPU attention
over extra fully masked keys gives the same bits (measured), so rows stay batch-invariant. Reference mode instead
slices each row's exact keys in the reference's order and calls SDPA as the reference does (spec 9.4).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.kv_cache import Attend, causal_mask, sdpa


class KVBudget:
    """Host bookkeeping of the page pool and the sequence slots: which pages and which slot each sequence holds."""

    def __init__(self, num_pages: int, page_bytes: int, num_slots: int) -> None:
        self.num_pages, self.page_bytes, self.num_slots = num_pages, page_bytes, num_slots
        self._free_pages = list(range(num_pages, 0, -1))  # popped from the end: low pages first
        self._free_slots = list(range(num_slots))  # a heap: the lowest free slot keeps the batch bucket small

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - len(self._free_pages)) * self.page_bytes

    def can_allocate(self, num_bytes: int) -> bool:
        return bool(self._free_slots) and num_bytes // self.page_bytes <= len(self._free_pages)

    def allocate(self, num_bytes: int) -> tuple[int, list[int]]:
        """A slot and num_bytes / page_bytes pages."""
        if not self.can_allocate(num_bytes):
            raise RuntimeError("KV budget exceeded")
        pages = [self._free_pages.pop() for _ in range(num_bytes // self.page_bytes)]
        return heapq.heappop(self._free_slots), pages

    def free(self, slot: int, pages: list[int]) -> None:
        heapq.heappush(self._free_slots, slot)
        self._free_pages.extend(reversed(pages))


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Sizes of the pool: what a page and a slot cost, fixed by the model config and the page size."""

    config: ModelConfig
    page_size: int
    element_size: int

    @property
    def page_bytes(self) -> int:
        full = [g for g in self.config.layers if not g.is_sliding]
        return sum(2 * g.num_kv_heads * self.page_size * g.head_dim * self.element_size for g in full)

    @property
    def ring_length(self) -> int:
        return self.config.sliding_window - 1 + self.config.canvas_length

    @property
    def slot_bytes(self) -> int:
        sliding = [g for g in self.config.layers if g.is_sliding]
        return sum(2 * g.num_kv_heads * self.ring_length * g.head_dim * self.element_size for g in sliding)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)


class KVPool:
    """The KV tensors: full layers [pages + 1, kv, P, d], sliding layers [slots, kv, W - 1 + C, d]."""

    def __init__(self, layout: KVLayout, num_slots: int, num_pages: int, device: torch.device, dtype: torch.dtype):
        self.layout, self.config = layout, layout.config
        self.window = self.config.sliding_window - 1  # slots a sliding layer holds
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for g in self.config.layers:
            if g.is_sliding:  # zeros: keys a row has not written yet are masked, and must be finite under the mask
                shape = (num_slots, g.num_kv_heads, layout.ring_length, g.head_dim)
                self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
                self.values.append(torch.zeros(shape, device=device, dtype=dtype))
            else:  # pages are zeroed when handed out (`clear`), so the pool's memory is touched only as it is used
                shape = (num_pages + 1, g.num_kv_heads, layout.page_size, g.head_dim)
                self.keys.append(torch.empty(shape, device=device, dtype=dtype))
                self.values.append(torch.empty(shape, device=device, dtype=dtype))
                self.keys[-1][0], self.values[-1][0] = 0, 0
        self.device = device

    def clear(self, pages: list[int]) -> None:
        index = torch.tensor(pages, device=self.device)
        for layer, g in enumerate(self.config.layers):
            if not g.is_sliding:
                self.keys[layer].index_fill_(0, index, 0)
                self.values[layer].index_fill_(0, index, 0)

    def token_index(self, pages: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) on the host of a sequence's positions [start, end) in the full-layer pool."""
        positions = torch.arange(start, end)
        return torch.tensor(pages)[positions // self.layout.page_size], positions % self.layout.page_size

    def full_keys(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv, n * P, d] of page table rows [B, n], in position order."""
        return tuple(pool[table].transpose(1, 2).flatten(2, 3) for pool in (self.keys[layer], self.values[layer]))

    def held_sliding(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's last min(length, W-1) sliding keys and values [kv, n, d], in position order."""
        index = torch.arange(max(0, length - self.window), length, device=self.device) % self.window
        return self.keys[layer][slot][:, index], self.values[layer][slot][:, index]


def encoder_attention(pool: KVPool, seqs: list, starts: list[int], lengths: list[int]) -> Attend:
    """Causal attention for a flattened batch [1, T]: sequence i's new tokens are [starts[i], starts[i] + lengths[i]).

    Runs sequence by sequence over exactly its keys (the encoder is not the step's bottleneck) and stores the new
    keys and values. Tokens outside every segment are alignment padding: not stored, output zero.
    """
    config, window = pool.config, pool.window
    plans = []
    for seq, n in zip(seqs, lengths, strict=True):
        queries = torch.arange(seq.length, seq.length + n, device=pool.device)[None]
        held = min(seq.length, window)
        plans.append(
            (
                tuple(t.to(pool.device) for t in pool.token_index(seq.pages, seq.length, seq.length + n)),
                torch.arange(seq.length + max(0, n - window), seq.length + n, device=pool.device) % window,
                {
                    False: causal_mask(torch.arange(seq.length + n, device=pool.device)[None], queries, None),
                    True: causal_mask(
                        torch.arange(seq.length - held, seq.length + n, device=pool.device)[None], queries, window + 1
                    ),
                },
            )
        )

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        out = None if q is None else torch.zeros_like(q)
        sliding = config.layers[layer].is_sliding
        for seq, (index, ring_index, masks), start, n in zip(seqs, plans, starts, lengths, strict=True):
            new_k, new_v = k[0, :, start : start + n], v[0, :, start : start + n]
            if sliding:
                held_k, held_v = pool.held_sliding(layer, seq.slot, seq.length)
                keys, values = torch.cat([held_k, new_k], dim=1), torch.cat([held_v, new_v], dim=1)
                keep = slice(n - ring_index.numel(), n)  # a chunk longer than the window keeps its last W-1
                pool.keys[layer][seq.slot][:, ring_index] = new_k[:, keep]
                pool.values[layer][seq.slot][:, ring_index] = new_v[:, keep]
            else:
                pool.keys[layer][index[0], :, index[1]] = new_k.transpose(0, 1)
                pool.values[layer][index[0], :, index[1]] = new_v.transpose(0, 1)
                keys, values = pool.full_keys(layer, torch.tensor([seq.pages], device=pool.device))
                keys, values = keys[0, :, : seq.length + n], values[0, :, : seq.length + n]
            if out is not None:
                out[:, :, start : start + n] = sdpa(
                    q[:, :, start : start + n], keys[None], values[None], masks[sliding]
                )
        return out

    return attend


def page_bucket(pages: int) -> int:
    """The page table's width: a power of two (at least 2, which keeps a compiled graph's page dimension symbolic),
    so that the table takes few shapes. Pages past a row's own are page 0, masked: CPU attention over extra fully
    masked keys gives the same bits."""
    return max(2, 1 << (pages - 1).bit_length())


def page_table(rows: list, width: int) -> list[list[int]]:
    """[B, width] pages of each row of a step's bucket; rows[i] is the sequence in slot i, or None for a slot that
    is idle or still encoding (all page 0: its canvas is written to the trash page)."""
    return [(seq.pages if seq is not None else []) + [0] * (width - (len(seq.pages) if seq is not None else 0))
            for seq in rows]  # fmt: skip


@dataclass(slots=True)
class DecoderBatch:
    """Where each row of a step reads and writes, derived on the device from the page table and the lengths, so that
    a compiled or captured step takes only those two as inputs."""

    table: torch.Tensor  # [B, n] pages of each row (0 past its pages)
    canvas_page: torch.Tensor  # [B, C] page and offset of each canvas position in the full-layer pool
    canvas_offset: torch.Tensor
    ring_slot: torch.Tensor  # [B, C] slot and index of each canvas position in the sliding rings
    ring_offset: torch.Tensor
    full_valid: torch.Tensor  # [B, 1, 1, n * P] bool: prefix and canvas keys of full layers
    sliding_valid: torch.Tensor  # [B, 1, 1, W - 1 + C] bool: held ring slots and the canvas


def decoder_batch(pool: KVPool, table: torch.Tensor, length: torch.Tensor, canvas_length: int) -> DecoderBatch:
    """table [B, n] from page_table, length [B] committed tokens of each row (0 for rows not denoising)."""
    page_size, window, device = pool.layout.page_size, pool.window, table.device
    rows, width = table.shape
    canvas = torch.arange(canvas_length, device=device)
    positions = length[:, None] + canvas  # [B, C]
    full = torch.arange(width * page_size, device=device) < (length + canvas_length)[:, None]
    ring = torch.arange(window + canvas_length, device=device)
    sliding = (ring < length.clamp(max=window)[:, None]) | (ring >= window)
    return DecoderBatch(
        table,
        table.gather(1, positions // page_size),
        positions % page_size,
        torch.arange(rows, device=device)[:, None].expand(rows, canvas_length),
        (window + canvas).expand(rows, canvas_length),
        full[:, None, None],
        sliding[:, None, None],
    )


# One opaque in-place op per layer: a compiled graph that indexed into the pool itself would be functionalised
# into a copy of the whole pool tensor, and the pool is most of the device's memory.
@torch.library.custom_op("dgserve::store_kv", mutates_args=("keys", "values"))
def store_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    offset: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """keys[index, :, offset] = k and likewise values, for a pool [N, kv, L, d], index and offset [B, C] and the
    new keys and values [B, kv, C, d]."""
    keys[index, :, offset] = k.transpose(1, 2)
    values[index, :, offset] = v.transpose(1, 2)


@store_kv.register_fake
def _(keys, values, index, offset, k, v) -> None:
    return None


def decoder_attention(pool: KVPool, batch: DecoderBatch) -> Attend:
    """Bidirectional attention of canvas rows [B, C] over their held keys plus the canvas, one call per layer.

    Grouped-query heads attend as [B, kv, groups * C, d] against [B, kv, n, d]: K/V are never repeated.
    """
    rows = batch.table.shape[0]

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        keys, values = pool.keys[layer], pool.values[layer]
        if pool.config.layers[layer].is_sliding:
            store_kv(keys, values, batch.ring_slot, batch.ring_offset, k, v)
            keys, values, valid = keys[:rows], values[:rows], batch.sliding_valid
        else:
            store_kv(keys, values, batch.canvas_page, batch.canvas_offset, k, v)
            (keys, values), valid = pool.full_keys(layer, batch.table), batch.full_valid
        b, heads, length, d = q.shape
        grouped = q.reshape(b, keys.shape[1], -1, d)  # head j uses KV head j // groups
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid, scale=1.0)
        return out.view(b, heads, length, d)

    return attend


def reference_decoder_attention(pool: KVPool, seq, canvas_length: int) -> Attend:
    """One row, its exact keys in the reference's order, SDPA called as the reference calls it (spec 9.4)."""
    index = [t.to(pool.device) for t in pool.token_index(seq.pages, seq.length, seq.length + canvas_length)]
    table = torch.tensor([seq.pages], device=pool.device)

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        if pool.config.layers[layer].is_sliding:
            held_k, held_v = pool.held_sliding(layer, seq.slot, seq.length)
            keys, values = torch.cat([held_k, k[0]], dim=1), torch.cat([held_v, v[0]], dim=1)
        else:
            pool.keys[layer][index[0], :, index[1]] = k[0].transpose(0, 1)
            pool.values[layer][index[0], :, index[1]] = v[0].transpose(0, 1)
            keys, values = pool.full_keys(layer, table)
            keys, values = keys[0, :, : seq.length + canvas_length], values[0, :, : seq.length + canvas_length]
        return sdpa(q, keys[None], values[None], None)

    return attend
