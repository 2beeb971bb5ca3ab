"""Prefix caching: full pages of encoded tokens, shared by content between requests (host bookkeeping only).

A page of P encoded tokens (a prompt's, or a committed canvas's) becomes a Block once the encoder has written it. Its
key is (parent, its P tokens): the parent is the block before it in the sequence, named by a unique id that is never
reused, or the request's cache salt for the first page. The key holds the tokens themselves and a dict compares keys
by equality, so two different prefixes never share a block, whatever their hashes.

Full layers read every earlier token, so a hit of k pages needs the k pages' full-layer KV: the Block's page, shared by
reference count and never written again (a sequence writes only at or past its length). Sliding layers keep a ring of
the last W - 1 tokens (engine/kv_cache.py) that the rest of the prompt is encoded against, and those keys cannot be
recomputed without encoding the whole prefix again. So each Block also keeps a copy of its page's sliding-layer KV in
a store of its own, copied into the ring on a hit: a hit ends at k pages only where the pages covering
[kP - (W - 1), kP) still have their copy.

Blocks no sequence holds stay cached until their page is needed: pages are evicted least recently used first (a
finished sequence's last pages before its first ones), never while a sequence holds them. Copies in the sliding store
are evicted on their own, least recently used first.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Block:
    id: int
    key: tuple
    page: int  # full-layer page
    sliding: int  # page of the sliding store holding this page's sliding-layer KV; 0: none
    refs: int = 0  # running sequences holding the page


class PrefixCache:
    def __init__(self, page_size: int, window: int, num_sliding_pages: int) -> None:
        self.page_size, self.window, self.num_sliding_pages = page_size, window, num_sliding_pages
        self.blocks: dict[tuple, Block] = {}
        self._unused: OrderedDict[int, Block] = OrderedDict()  # blocks no sequence holds, least recently used first
        self._sliding_free = list(range(num_sliding_pages, 0, -1))  # store page 0 is never used
        self._sliding_used: OrderedDict[int, Block] = OrderedDict()  # store page -> its block, least recent first
        self._ids = itertools.count(1)
        self._evictions = 0  # since take_evictions

    @property
    def num_unused(self) -> int:
        return len(self._unused)

    def match(self, token_ids: Sequence[int], salt: str | None) -> list[Block]:
        """The longest run of cached blocks starting the sequence whose sliding state can be restored."""
        p, chain, parent = self.page_size, [], salt
        for start in range(0, len(token_ids) - p + 1, p):
            if (block := self.blocks.get((parent, tuple(token_ids[start : start + p])))) is None:
                break
            chain.append(block)
            parent = block.id
        for k in range(len(chain), 0, -1):  # the ring of a hit of k pages holds [kP - (W - 1), kP)
            if all(b.sliding for b in chain[max(0, k * p - self.window) // p : k]):
                return chain[:k]
        return []

    def take_evictions(self) -> int:
        """Pages evicted since the last call."""
        evictions, self._evictions = self._evictions, 0
        return evictions

    def acquire(self, blocks: list[Block]) -> None:
        """A sequence starts holding these blocks' pages; their sliding copies count as used now."""
        for block in blocks:
            if block.refs == 0:
                del self._unused[block.id]
            block.refs += 1
            if block.sliding:
                self._sliding_used.move_to_end(block.sliding)

    def release(self, blocks: list[Block]) -> None:
        """A sequence stops holding these blocks (in position order): the last are evicted first."""
        for block in reversed(blocks):
            block.refs -= 1
            if block.refs == 0:
                self._unused[block.id] = block

    def evict_page(self) -> int | None:
        """A page no sequence holds, taken from the least recently used block (None: there is none)."""
        if not self._unused:
            return None
        _, block = self._unused.popitem(last=False)
        del self.blocks[block.key]
        self._drop_sliding(block)
        self._evictions += 1
        return block.page

    def take_sliding(self) -> int:
        """A free page of the sliding store, evicting the least recently used copy if none is; 0 if the store is
        empty (the block is then cached without its copy, and serves only as part of longer hits)."""
        if self._sliding_free:
            return self._sliding_free.pop()
        if self._sliding_used:
            page, block = self._sliding_used.popitem(last=False)
            block.sliding = 0
            return page
        return 0

    def free_sliding(self, pages: list[int]) -> None:
        self._sliding_free.extend(page for page in pages if page)

    def register(self, parent: Block | str | None, token_ids: Sequence[int], page: int, sliding: int) -> Block:
        """Cache a page the encoder has just written (its sliding copy in store page `sliding`, 0 for none), held by
        the sequence that wrote it. If another sequence cached the same content first, that block is returned and
        this page stays the writer's own."""
        key = (parent.id if isinstance(parent, Block) else parent, tuple(token_ids))
        if (block := self.blocks.get(key)) is None:
            block = self.blocks[key] = Block(next(self._ids), key, page, 0, refs=1)
        if sliding and not block.sliding:
            block.sliding = sliding
            self._sliding_used[sliding] = block
        elif sliding:
            self.free_sliding([sliding])
        return block

    def _drop_sliding(self, block: Block) -> None:
        if block.sliding:
            del self._sliding_used[block.sliding]
            self._sliding_free.append(block.sliding)
            block.sliding = 0
