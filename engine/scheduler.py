"""What runs next, and what it did: admission against the KV pages, the batch of each iteration, and each sequence's
canvas cycle (spec 6.2): encode the prompt, start a canvas, denoise it step by step (settling its prefix), commit it
when it stops or runs out of steps, encode the commit, start the next. Output ends at a stop token or at max_tokens.

The scheduler is the only writer of a Sequence. It holds no tensors: the model runner reads the batch and returns
each row's outcome (StepOutput), which `postprocess` turns into events.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engine.kv_cache import KVBudget
from engine.request import (
    BlockCommitted,
    Draft,
    EngineEvent,
    Failed,
    Finished,
    FinishReason,
    Logprob,
    QueueFullError,
    Request,
    SamplingParams,
    Usage,
)
from engine.sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens of a sequence to encode this iteration (prompt or a committed canvas), from position `start`."""

    seq: Sequence
    start: int
    token_ids: list[int]
    saves: tuple[tuple[int, int], ...] = ()  # (page index, sliding-store page): pages it completes that are cached


@dataclass(frozen=True, slots=True)
class Restore:
    """A prefix-cache hit's sliding-window state: positions [start, end) of the slot's rings, from the sliding store
    pages holding page start // P onwards (engine/prefix_cache.py)."""

    slot: int
    start: int
    end: int
    pages: tuple[int, ...]


@dataclass(slots=True)
class Batch:
    admitted: list[Sequence]  # new this iteration: their new pages are cleared before anything runs
    restores: list[Restore]  # then the rings of the cache hits among them are filled
    encode: list[Chunk]
    starts: list[Sequence]  # canvases that start after the encode (their pending tokens are all in)
    denoise: list[Sequence]  # every running sequence with nothing left to encode: one denoising step each


@dataclass(frozen=True, slots=True)
class RowOutput:
    """One denoised row's outcome, as the model runner read it back from the device."""

    tokens: list[int]  # the argmax canvas
    commits: bool  # the canvas ends now: it stopped, ran out of steps, or its settled prefix holds all it can give
    settled: int  # leading pinned positions (given or settled)
    candidates: list[list[int]] | None = None  # a constrained row that commits: top ids per position (grammar walk)


# (row of the batch's denoise list, first canvas position, token ids, k) -> each token's Logprob with k alternatives.
Scorer = Callable[[list[tuple[int, int, list[int], int]]], list[tuple[Logprob, ...]]]


def _no_scores(blocks: list[tuple[int, int, list[int], int]]) -> list[tuple[Logprob, ...]]:
    return []


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What the model runner did with a Batch."""

    rows: list[RowOutput] = field(default_factory=list)  # one per Batch.denoise sequence, in order
    logprobs: Scorer = _no_scores  # scores committed tokens at this step's distribution (for rows that ask)
    num_encoded: int = 0
    encode_s: float = 0.0
    denoise_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        budget: KVBudget,
        canvas_length: int,
        max_num_seqs: int,
        max_waiting: int,
        prefill_chunk: int | None,
        max_batched_tokens: int | None = None,
    ) -> None:
        self.budget, self.canvas_length = budget, canvas_length
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.prefill_chunk = prefill_chunk  # None: all pending tokens in one pass
        # Encoder tokens of one iteration (None: no bound), so that the profiled activation peak holds for any mix.
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache, self.page_size = budget.cache, canvas_length  # a page holds one canvas (engine/kv_cache.py)
        self._saving: list[int] = []  # sliding-store pages the iteration in flight writes, until they are cached

    def add(self, requests: list[tuple[Request, SamplingParams, int]]) -> None:
        """Queue validated requests, each with its resolved parameters and the KV pages it is charged; raises
        QueueFullError, queueing none, if they do not all fit the queue."""
        free_slots = max(0, self.max_num_seqs - len(self.running))  # these admit at the next iteration
        if len(self.waiting) + len(requests) > self.max_waiting + free_slots:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        for request, params, num_pages in requests:
            # temperature 0 is deterministic: a fixed seed also fixes the renoising draws.
            seed = params.seed if params.seed is not None else 0 if params.temperature == 0 else secrets.randbits(63)
            self.waiting.append(Sequence(request, params, seed, num_pages, self.canvas_length))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Admit waiting sequences in arrival order while slots and KV pages last, each starting after its longest
        cached prefix; plan this iteration's encoder chunks (advancing each sequence past them) and the canvases they
        complete; everything else denoises."""
        admitted, restores, starts = [], [], []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # No hit saves more than the prompt's full pages: while even that would not fit, skip the lookup.
            if not self.budget.can_allocate(seq.num_pages - len(seq.request.prompt_ids) // self.page_size):
                break
            hit = self.cache.match(seq.request.prompt_ids, seq.request.cache_salt) if self.cache else []
            if not self.budget.can_allocate(seq.num_pages, hit):
                break
            self.waiting.popleft()
            seq.slot, seq.pages = self.budget.allocate(seq.num_pages, hit)
            seq.blocks, seq.length = hit, len(hit) * self.page_size
            seq.num_cached, seq.status = seq.length, Status.RUNNING
            seq.token_ids, seq.to_encode = list(seq.request.prompt_ids), list(seq.request.prompt_ids[seq.length :])
            if hit and self.cache.window:
                start = max(0, seq.length - self.cache.window)
                restores.append(
                    Restore(seq.slot, start, seq.length, tuple(b.sliding for b in hit[start // self.page_size :]))
                )
            if not seq.to_encode:  # the whole prompt was cached
                self._start(seq, starts)
            self.running.append(seq)
            admitted.append(seq)
        encode, tokens = [], 0
        for seq in self.running:
            if not seq.to_encode:
                continue
            # A sequence's chunks start at fixed offsets of its own tokens, whatever else runs, so its numbers stay
            # batch-invariant; a chunk that does not fit waits whole for the next iteration.
            n = len(seq.to_encode) if self.prefill_chunk is None else min(len(seq.to_encode), self.prefill_chunk)
            if self.max_batched_tokens is not None and tokens + n > self.max_batched_tokens:
                continue
            encode.append(Chunk(seq, seq.length, seq.to_encode[:n], self._saves(seq.length, seq.length + n)))
            seq.length, seq.to_encode, tokens = seq.length + n, seq.to_encode[n:], tokens + n
            if not seq.to_encode:
                self._start(seq, starts)
        return Batch(admitted, restores, encode, starts, [s for s in self.running if not s.to_encode])

    def _saves(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Sliding-store pages for the pages that encoding [start, end) completes, the last first (a later request
        most likely stops sharing where this encode ends); fewer if the store runs out."""
        if self.cache is None:
            return ()
        saves = []
        for j in reversed(range(start // self.page_size, end // self.page_size)):
            if not (store := self.cache.take_sliding()):
                break
            saves.append((j, store))
        self._saving += [store for _, store in saves]
        return tuple(saves)

    @staticmethod
    def _start(seq: Sequence, starts: list[Sequence]) -> None:
        seq.canvas_steps, seq.pinned_prefix, seq.streamed = 0, 0, 0
        starts.append(seq)

    def _cache(self, chunks: list[Chunk]) -> None:
        """Cache the pages the encoder completed this iteration, each keyed by its tokens and the block before it."""
        p = self.page_size
        for chunk in chunks:
            seq, saves = chunk.seq, dict(chunk.saves)
            for j in range(chunk.start // p, (chunk.start + len(chunk.token_ids)) // p):
                parent = seq.blocks[j - 1] if j else seq.request.cache_salt
                tokens = seq.token_ids[j * p : (j + 1) * p]
                seq.blocks.append(self.cache.register(parent, tokens, seq.pages[j], saves.get(j, 0)))
        self._saving = []

    def postprocess(self, batch: Batch, output: StepOutput) -> list[EngineEvent]:
        """Count the step for every denoised row; emit drafts and settled prefixes; commit the canvases that
        finished (walked under their grammar), ending the sequence or queueing the canvas for the encoder."""
        if self.cache is not None:
            self._cache(batch.encode)
        events: list[EngineEvent] = []
        scored: list[tuple[int, int, int, list[int], int]] = []  # event index, row, first position, ids, k
        for row, (seq, out) in enumerate(zip(batch.denoise, output.rows, strict=True)):
            start = seq.streamed
            seq.canvas_steps += 1
            seq.num_denoise_steps += 1
            seq.pinned_prefix = out.settled
            if seq.params.stream_drafts:  # what may still be output, and any pins past it (an infill's suffix)
                pins = seq.pinned_spans()
                shown = max(seq.tokens_left, pins[-1][1] if pins else 0)
                events.append(Draft(seq.request_id, out.tokens[:shown], seq.canvas_steps, pins))
            at = len(events)  # where this row's block goes, if it streams one
            if out.commits:
                ids = self._commit(seq, out, events)
            elif seq.settles and (upto := min(out.settled, seq.tokens_left)) > seq.streamed:
                ids = out.tokens[seq.streamed : upto]
                events.append(BlockCommitted(seq.request_id, ids, seq.canvas_steps, partial=True))
                seq.streamed = upto
            else:
                ids = None
            if ids is not None and seq.params.logprobs is not None:
                scored.append((at, row, start, ids, seq.params.logprobs))
        if scored:  # every block's logprobs at the step that committed it, in one pass
            scores = output.logprobs([(row, start, ids, k) for _, row, start, ids, k in scored])
            for (i, *_), logprobs in zip(scored, scores, strict=True):
                events[i] = replace(events[i], logprobs=logprobs)
        return events

    def _commit(self, seq: Sequence, out: RowOutput, events: list[EngineEvent]) -> list[int] | None:
        """Commit the argmax canvas (walked under the grammar if constrained): stream what its settled prefix did not,
        up to a stop token, the grammar's end or max_tokens, then finish or queue the canvas for the encoder. Returns
        the ids the streamed block's logprobs score (its tokens, then the stop token), None if it streamed none."""
        remaining, tokens = seq.tokens_left, out.tokens
        window, complete = tokens[:remaining], False
        if seq.constraint is not None:
            window, complete = seq.constraint.commit(window, out.candidates, remaining)
            tokens = window + tokens[len(window) :]
        stop_ids = set(seq.params.stop_token_ids)
        stop_at = next((i for i, t in enumerate(window) if t in stop_ids), None)
        kept = window if stop_at is None else window[:stop_at]
        stop = None if stop_at is None else window[stop_at]
        scored = None
        if kept[seq.streamed :] or (stop is not None and seq.params.logprobs is not None):  # the stop token's entry
            events.append(BlockCommitted(seq.request_id, kept[seq.streamed :], seq.canvas_steps, stop_token_id=stop))
            scored = kept[seq.streamed :] + ([] if stop is None else [stop])
        seq.num_output_tokens += len(kept)
        seq.streamed = 0  # counted in num_output_tokens now
        seq.num_canvases += 1
        if stop_at is not None or complete or remaining <= seq.canvas_length:
            reason = FinishReason.STOP if stop_at is not None or complete else FinishReason.LENGTH
            self._release(seq)
            events.append(Finished(seq.request_id, reason, self._usage(seq, stop_at is not None)))
        else:
            seq.to_encode = tokens  # the whole canvas enters the cache (spec 6.2)
            seq.token_ids += tokens
        return scored

    def abort(self, request_id: str) -> Finished | None:
        """Drop a sequence wherever it is (its memory is free for the next iteration); its Finished event."""
        for seq in (*self.waiting, *self.running):
            if seq.request_id == request_id:
                if seq.status is Status.WAITING:
                    self.waiting.remove(seq)
                    seq.status = Status.FINISHED
                else:
                    self._release(seq)
                return Finished(request_id, FinishReason.ABORT, self._usage(seq, False))
        return None

    def fail(self, seqs: list[Sequence], error: str) -> list[Failed]:
        """Drop these sequences (their memory is free for the next iteration) with a Failed event each."""
        if self.cache is not None:  # the iteration that wrote them failed
            self.cache.free_sliding(self._saving)
            self._saving = []
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.abort(seq.request_id)
        return [Failed(seq.request_id, error) for seq in seqs]

    @staticmethod
    def _usage(seq: Sequence, stopped: bool) -> Usage:
        """The stop token counts as a completion token; so does a settled prefix already streamed."""
        completion = seq.num_output_tokens + seq.streamed + stopped
        return Usage(len(seq.request.prompt_ids), completion, seq.num_canvases, seq.num_denoise_steps, seq.num_cached)

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.budget.free(seq.slot, seq.pages, seq.blocks)
        seq.slot, seq.pages, seq.blocks, seq.status = -1, [], [], Status.FINISHED
