"""The attention each pass runs over the paged KV cache (spec 4.2-4.3, 5).

The encoder runs sequence by sequence over exactly its keys and stores the new ones. The denoising step is one
masked attention call per layer over every row of a bucket of slots: a row's valid keys sit at the same indices
whatever else is in the batch (prefix, then canvas, for full layers), and CPU attention over extra fully masked keys
gives the same bits (measured), so rows stay batch-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.kv_cache import KVPool
from models.attend import Attend, causal_mask, sdpa

if TYPE_CHECKING:
    from engine.scheduler import Chunk


def encoder_attention(
    pool: KVPool, chunks: list[Chunk], offsets: list[int], query_align: int = 1, key_block: int = 1
) -> Attend:
    """Causal attention for a flattened batch [1, T]: chunk i's tokens are [offsets[i], offsets[i] + n_i).

    Runs chunk by chunk over exactly its sequence's keys (the encoder is not the step's bottleneck) and stores the
    new keys and values, and the sliding-layer KV of the pages each chunk completes that the prefix cache keeps
    (Chunk.saves). Tokens outside every chunk are alignment padding: not stored, output zero.

    A chunk's queries are padded to a multiple of query_align, and its keys laid out from and to multiples of key_block
    positions (zeros where none is held, masked), so that no token's numbers depend on where its chunk starts or ends:
    with 4 and 512 (the CPU flash kernel's KV block), a prompt encoded in any chunks, or its rest after a prefix-cache
    hit, writes the same bits (measured). 1 and 1: the reference's exact shapes.
    """
    config, window, device, page = pool.config, pool.window, pool.device, pool.layout.page_size
    plans = []
    for chunk in chunks:
        start, n = chunk.start, len(chunk.token_ids)
        end, rows = start + n, -(-n // query_align) * query_align
        last = -(-(start + rows) // key_block) * key_block  # keys end here ...
        low = max(0, start - window)  # ... and start at 0 (full layers) or before the first the rings hold
        first = low // key_block * key_block
        queries = torch.arange(start, start + rows, device=device)[None]
        plans.append(
            (
                tuple(t.to(device) for t in pool.token_index(chunk.seq.pages, start, end)),
                torch.arange(start + max(0, n - window), end, device=device) % window,
                {
                    False: (0, causal_mask(torch.arange(last, device=device)[None], queries, None)),
                    True: (first, causal_mask(torch.arange(first, last, device=device)[None], queries, window + 1)),
                },
            )
        )

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        out = None if q is None else torch.zeros_like(q)
        sliding = config.layers[layer].is_sliding
        for chunk, (index, ring_index, masks), at in zip(chunks, plans, offsets, strict=True):
            seq, n, start = chunk.seq, len(chunk.token_ids), chunk.start
            new_k, new_v = k[0, :, at : at + n], v[0, :, at : at + n]
            first, mask = masks[sliding]
            if sliding:
                held_k, held_v = pool.held_sliding(layer, seq.slot, start)
                low = start - held_k.shape[1]
                keys, values = (_laid_out(torch.cat(t, dim=1), low - first, mask.shape[-1]) for t in
                                ((held_k, new_k), (held_v, new_v)))  # fmt: skip
                keep = slice(n - ring_index.numel(), n)  # a chunk longer than the window keeps its last W-1
                pool.keys[layer][seq.slot][:, ring_index] = new_k[:, keep]
                pool.values[layer][seq.slot][:, ring_index] = new_v[:, keep]
                for j, store in chunk.saves:  # positions [jP, (j+1)P) the rings held or this chunk brings
                    a, b = max(j * page, low), (j + 1) * page
                    pool.saved_keys[layer][store, :, a - j * page :] = keys[:, a - first : b - first]
                    pool.saved_values[layer][store, :, a - j * page :] = values[:, a - first : b - first]
            else:
                pool.keys[layer][index[0], :, index[1]] = new_k.transpose(0, 1)
                pool.values[layer][index[0], :, index[1]] = new_v.transpose(0, 1)
                keys, values = pool.full_keys(layer, torch.tensor([seq.pages], device=device))
                keys, values = (_laid_out(t[0, :, : mask.shape[-1]], 0, mask.shape[-1]) for t in (keys, values))
            if out is not None:
                rows = q[:, :, at : at + n]
                rows = F.pad(rows, (0, 0, 0, mask.shape[-2] - n)) if mask.shape[-2] > n else rows
                out[:, :, at : at + n] = sdpa(rows, keys[None], values[None], mask)[:, :, :n]
        return out

    return attend


def _laid_out(x: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """x [kv, n, d] placed at `offset` of zeros [kv, length, d]."""
    if offset == 0 and x.shape[1] == length:
        return x
    out = x.new_zeros(x.shape[0], length, x.shape[2])
    out[:, offset : offset + x.shape[1]] = x
    return out


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
