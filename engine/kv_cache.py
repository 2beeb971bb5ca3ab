"""All sequences' KV memory, allocated once, counted in pages (spec 4.2-4.3).

Full layers keep every committed token in a pool of pages of `page_size` tokens (one canvas), shared by all sequences
through per-sequence page lists; full pages of encoded tokens are shared by content (engine/prefix_cache.py). Page 0
is never handed out: table entries past a sequence's pages point at it, and rows that are not denoising write their
canvas there. Sliding layers keep, per sequence slot, a ring of the last W-1 tokens (position p at p mod (W-1))
followed by the canvas being denoised, so a step writes in place and never concatenates.

KVLayout says what a page and a slot cost, KVBudget (host) which of them each sequence holds, KVPool (device) the
tensors, with the prefix cache's store of cached pages' sliding-layer KV. The attention passes over them are in
engine/attention.py.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from engine.prefix_cache import Block, PrefixCache
from models.config import ModelConfig


class KVBudget:
    """Host bookkeeping of the page pool and the sequence slots: which pages and which slot each sequence holds. With a
    PrefixCache, a sequence's first pages may be cached blocks it shares, and pages no sequence holds stay cached
    until a new page is needed."""

    def __init__(self, num_pages: int, num_slots: int, cache: PrefixCache | None = None) -> None:
        self.num_pages, self.num_slots, self.cache = num_pages, num_slots, cache
        self._free_pages = list(range(num_pages, 0, -1))  # popped from the end: low pages first
        self._free_slots = list(range(num_slots))  # a heap: the lowest free slot keeps the batch bucket small

    @property
    def num_used(self) -> int:
        """Pages sequences hold (cached pages none holds are free to take)."""
        return self.num_pages - len(self._free_pages) - (self.cache.num_unused if self.cache else 0)

    def can_allocate(self, num_pages: int, hit: list[Block] | None = None) -> bool:
        """Whether a slot and num_pages pages are there, the first of them the cached blocks `hit`."""
        hit = hit or []
        unused = self.cache.num_unused - sum(b.refs == 0 for b in hit) if self.cache else 0
        return bool(self._free_slots) and num_pages - len(hit) <= len(self._free_pages) + unused

    def allocate(self, num_pages: int, hit: list[Block] | None = None) -> tuple[int, list[int]]:
        """A slot and num_pages pages: the pages of the cached blocks `hit`, then new ones (evicting cached pages none
        holds, least recently used first, once no page is free)."""
        hit = hit or []
        if not self.can_allocate(num_pages, hit):
            raise RuntimeError("KV budget exceeded")
        if self.cache:
            self.cache.acquire(hit)
        new = [
            self._free_pages.pop() if self._free_pages else self.cache.evict_page() for _ in range(num_pages - len(hit))
        ]
        return heapq.heappop(self._free_slots), [b.page for b in hit] + new

    def free(self, slot: int, pages: list[int], blocks: list[Block]) -> None:
        """Give back a sequence's slot and pages; `blocks` are the cached blocks of its first pages, and the pages that
        are their blocks' go back to the cache."""
        heapq.heappush(self._free_slots, slot)
        held = [block for block, page in zip(blocks, pages, strict=False) if block.page == page]
        if self.cache:
            self.cache.release(held)
        cached = {block.page for block in held}
        self._free_pages.extend(reversed([page for page in pages if page not in cached]))


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Sizes of the pool: what a page and a slot cost, fixed by the model config and the page size."""

    config: ModelConfig
    page_size: int
    element_size: int

    @classmethod
    def of(cls, config: ModelConfig, dtype: torch.dtype) -> KVLayout:
        """The engine's layout: pages of one canvas, for keys and values of `dtype`."""
        return cls(config, config.canvas_length, torch.empty((), dtype=dtype).element_size())

    def _bytes(self, sliding: bool, tokens: int) -> int:
        """Keys and values of `tokens` positions in every sliding (or every full) layer."""
        layers = [g for g in self.config.layers if g.is_sliding == sliding]
        return sum(2 * g.num_kv_heads * tokens * g.head_dim * self.element_size for g in layers)

    @property
    def page_bytes(self) -> int:
        return self._bytes(False, self.page_size)

    @property
    def sliding_page_bytes(self) -> int:
        """A page of the prefix cache's sliding store: the sliding layers' KV of one page."""
        return self._bytes(True, self.page_size)

    @property
    def ring_length(self) -> int:
        return self.config.sliding_window - 1 + self.config.canvas_length

    @property
    def slot_bytes(self) -> int:
        return self._bytes(True, self.ring_length)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def split(self, budget_bytes: int, num_slots: int, cache_fraction: float = 0.0) -> tuple[int, int]:
        """The full-layer pages and the sliding-store pages a KV budget holds beside the sliding-window rings of
        num_slots sequences, the store taking cache_fraction of what the rings leave."""
        left = budget_bytes - num_slots * self.slot_bytes
        sliding = int(max(left, 0) * cache_fraction) // self.sliding_page_bytes if self.sliding_page_bytes else 0
        pages = (left - sliding * self.sliding_page_bytes) // self.page_bytes
        if pages < 1:
            raise ValueError(
                f"a KV budget of {budget_bytes / 2**20:.1f} MiB cannot hold the sliding windows of {num_slots} "
                f"sequences ({num_slots * self.slot_bytes / 2**20:.1f} MiB) and one page; raise it or lower "
                "max_num_seqs"
            )
        return pages, sliding


class KVPool:
    """The KV tensors: full layers [pages + 1, kv, P, d], sliding layers [slots, kv, W - 1 + C, d], and the prefix
    cache's sliding store [sliding pages + 1, kv, P, d] per sliding layer (engine/prefix_cache.py)."""

    def __init__(
        self,
        layout: KVLayout,
        num_slots: int,
        num_pages: int,
        device: torch.device,
        dtype: torch.dtype,
        num_sliding_pages: int = 0,
    ) -> None:
        self.layout, self.config = layout, layout.config
        self.window = self.config.sliding_window - 1  # slots a sliding layer holds
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.saved_keys: dict[int, torch.Tensor] = {}  # sliding layer -> its store
        self.saved_values: dict[int, torch.Tensor] = {}
        for layer, g in enumerate(self.config.layers):
            if g.is_sliding:  # zeros: keys a row has not written yet are masked, and must be finite under the mask
                shape = (num_slots, g.num_kv_heads, layout.ring_length, g.head_dim)
                self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
                self.values.append(torch.zeros(shape, device=device, dtype=dtype))
                if num_sliding_pages:
                    shape = (num_sliding_pages + 1, g.num_kv_heads, layout.page_size, g.head_dim)
                    self.saved_keys[layer] = torch.zeros(shape, device=device, dtype=dtype)
                    self.saved_values[layer] = torch.zeros(shape, device=device, dtype=dtype)
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

    def restore(self, slot: int, start: int, end: int, pages: tuple[int, ...]) -> None:
        """Fill a slot's rings with positions [start, end) of a prefix-cache hit from the sliding store, where
        pages[i] holds page start // P + i."""
        p, device = self.layout.page_size, self.device
        positions = torch.arange(start, end)
        page = torch.tensor(pages)[positions // p - start // p].to(device)
        offset, ring = (positions % p).to(device), (positions % self.window).to(device)
        for layer, saved in self.saved_keys.items():
            self.keys[layer][slot][:, ring] = saved[page, :, offset].transpose(0, 1)
            self.values[layer][slot][:, ring] = self.saved_values[layer][page, :, offset].transpose(0, 1)

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
