"""What runs next: admission against the KV budget, the batch of each iteration, and turning finished canvases into
events (spec 6.2: a canvas stops when stable and confident or out of steps; output stops at a stop token or at
max_tokens). Holds no tensors beyond the ids it is handed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv_cache import KVBudget
from engine.request import (
    BlockCommitted,
    ContextLengthError,
    Draft,
    EngineEvent,
    Finished,
    FinishReason,
    QueueFullError,
    Usage,
)
from engine.sequence import Sequence, Status


@dataclass(slots=True)
class Batch:
    admitted: list[Sequence]  # need KV memory allocated before anything else
    encode: list[tuple[Sequence, int]]  # the next n pending tokens (prompt or commit) of each; a canvas starts after
    denoise: list[Sequence]  # every running sequence with nothing left to encode: one denoising step each


class Scheduler:
    def __init__(
        self,
        budget: KVBudget,
        max_num_seqs: int,
        max_waiting: int,
        bytes_for: Callable[[Sequence], int],
        prefill_chunk: int | None,
        max_batched_tokens: int | None = None,
    ) -> None:
        self.budget, self.max_num_seqs, self.max_waiting = budget, max_num_seqs, max_waiting
        self.prefill_chunk = prefill_chunk  # None: all pending tokens in one pass
        # Encoder tokens of one iteration (None: no bound), so that the profiled activation peak holds for any mix.
        self.max_batched_tokens = max_batched_tokens
        self.bytes_for = bytes_for  # Sequence -> KV bytes it will need at most
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; raises ContextLengthError if it could never fit, QueueFullError if the queue is full."""
        seq.kv_bytes = self.bytes_for(seq)
        if seq.kv_bytes > self.budget.total_bytes:
            raise ContextLengthError(
                f"request needs {seq.kv_bytes / 2**20:.1f} MiB of KV cache for {seq.kv_capacity} tokens, more than "
                f"the whole budget of {self.budget.total_bytes / 2**20:.1f} MiB; shorten the prompt or max_tokens"
            )
        free_slots = max(0, self.max_num_seqs - len(self.running))  # these admit at the next iteration
        if len(self.waiting) >= self.max_waiting + free_slots:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        """Admit waiting sequences in arrival order while slots and KV memory last; everything running denoises."""
        admitted = []
        while (
            self.waiting
            and len(self.running) < self.max_num_seqs
            and self.budget.can_allocate(self.waiting[0].kv_bytes)
        ):
            seq = self.waiting.popleft()
            seq.slot, seq.pages = self.budget.allocate(seq.kv_bytes)
            seq.status, seq.to_encode = Status.RUNNING, list(seq.prompt_ids)
            self.running.append(seq)
            admitted.append(seq)
        encode, tokens = [], 0
        for seq in self.running:
            n = self._encode_now(seq)
            # A chunk that does not fit waits whole for the next iteration (a partial one would move its offsets).
            if seq.to_encode and (self.max_batched_tokens is None or tokens + n <= self.max_batched_tokens):
                encode.append((seq, n))
                tokens += n
        encoding = {seq.request_id: n for seq, n in encode}
        denoise = [s for s in self.running if not s.to_encode or encoding.get(s.request_id) == len(s.to_encode)]
        return Batch(admitted, encode, denoise)

    def _encode_now(self, seq: Sequence) -> int:
        """Pending tokens `seq` encodes this iteration. Its chunks start at fixed offsets of its own tokens, whatever
        else runs, so its numbers stay batch-invariant."""
        pending = len(seq.to_encode)
        return pending if self.prefill_chunk is None else min(pending, self.prefill_chunk)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a sequence wherever it is; its memory is free for the next iteration."""
        for seq in (*self.waiting, *self.running):
            if seq.request_id == request_id:
                if seq.status is Status.WAITING:
                    self.waiting.remove(seq)
                else:
                    self._release(seq)
                seq.status = Status.FINISHED
                return seq
        return None

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.budget.free(seq.slot, seq.pages)
        seq.slot, seq.pages, seq.status = -1, [], Status.FINISHED

    @staticmethod
    def commits(seq: Sequence, is_stopped: bool, tokens: list[int], pinned_prefix: int) -> bool:
        """Whether the step just run (not yet counted by after_step) finishes this sequence's canvas: it stopped,
        ran out of steps, or (stream_prefix) its pinned prefix holds a stop token or all the output it can give."""
        if is_stopped or seq.steps_left == 1:
            return True
        if not seq.settles:
            return False
        stops = seq.params.stop_token_ids
        return pinned_prefix >= min(seq.tokens_left, seq.canvas_length) or any(
            t in stops for t in tokens[:pinned_prefix]
        )

    def after_step(
        self,
        seqs: list[Sequence],
        argmax: list[list[int]],
        stopped: list[bool],
        pinned_prefixes: list[int],
        candidates: dict[str, list[list[int]]],
    ) -> list[EngineEvent]:
        """Count the step; finish canvases that stopped or ran out of steps; emit drafts, settled prefixes, blocks
        and finishes. `candidates` holds the top-k ids per position of each constrained sequence whose canvas
        commits."""
        events: list[EngineEvent] = []
        for seq, tokens, is_stopped, prefix in zip(seqs, argmax, stopped, pinned_prefixes, strict=True):
            commits = self.commits(seq, is_stopped, tokens, prefix)
            seq.canvas_steps += 1
            seq.num_denoise_steps += 1
            seq.pinned_prefix = prefix
            if seq.params.stream_drafts:  # what may still be output, and any pins past it (an infill's suffix)
                pins = seq.pinned_spans()
                shown = max(seq.tokens_left, pins[-1][1] if pins else 0)
                events.append(Draft(seq.request_id, tokens[:shown], seq.canvas_steps, pins))
            if commits:
                events.extend(self._finish_canvas(seq, tokens, candidates.get(seq.request_id)))
            elif seq.settles and (upto := min(prefix, seq.tokens_left)) > seq.streamed:
                events.append(BlockCommitted(seq.request_id, tokens[seq.streamed : upto], seq.canvas_steps, True))
                seq.streamed = upto
        return events

    def _finish_canvas(self, seq: Sequence, tokens: list[int], candidates: list[list[int]] | None) -> list[EngineEvent]:
        """Commit the argmax canvas (walked under the grammar if constrained): stream what its settled prefix did not
        up to a stop token, the grammar's end or max_tokens, else queue it for the encoder."""
        remaining = seq.tokens_left
        window = tokens[:remaining]
        complete = False
        if seq.constraint is not None:
            window, complete = seq.constraint.commit(window, candidates, remaining)
            tokens = window + tokens[len(window) :]
        stop_ids = set(seq.params.stop_token_ids)
        stop_at = next((i for i, t in enumerate(window) if t in stop_ids), None)
        kept = window if stop_at is None else window[:stop_at]
        stop = None if stop_at is None else window[stop_at]
        events: list[EngineEvent] = []
        if kept[seq.streamed :] or (stop is not None and seq.params.logprobs is not None):  # the stop token's entry
            events.append(BlockCommitted(seq.request_id, kept[seq.streamed :], seq.canvas_steps, stop_token_id=stop))
        seq.num_output_tokens += len(kept)
        seq.streamed = 0  # counted in num_output_tokens now
        seq.num_canvases += 1
        if stop_at is not None or complete or remaining <= seq.canvas_length:
            reason = FinishReason.STOP if stop_at is not None or complete else FinishReason.LENGTH
            usage = Usage(
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=seq.num_output_tokens + (stop_at is not None),  # the stop token counts
                num_canvases=seq.num_canvases,
                num_denoise_steps=seq.num_denoise_steps,
            )
            self._release(seq)
            events.append(Finished(seq.request_id, reason, usage))
        else:
            seq.to_encode, seq.canvas_steps = tokens, 0  # the whole canvas enters the cache (spec 6.2)
        return events
