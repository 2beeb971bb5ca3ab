"""Grammar-constrained decoding for block diffusion: the committed text is valid by construction.

Block diffusion proposes all C positions of a canvas in parallel and commits a whole canvas at once, so a grammar
cannot mask one next-token distribution at a time as in left-to-right decoding. The constraint enters where a
canvas commits instead (Scheduler._finish_canvas), on the host and only for constrained rows:

* The committed canvas is walked left to right under the grammar (an llguidance matcher, advanced by exactly the
  tokens that commit). The longest run of argmax tokens the grammar accepts is taken in one `validate_tokens` call;
  at the first position it refuses, the position takes its most likely allowed token from a short candidate list
  (the top-k ids of the last step's logits at that position, which the model runner computes for the committing
  constrained rows only: unconstrained batches pay nothing), else a grammar-chosen token (below). The walk then
  resumes from the next position, so the model's tokens are kept wherever they fit the structure.
* A grammar-chosen token is the forced one when the grammar allows exactly one continuation, else the first allowed
  of a fixed preference list that closes structures (string delimiters, `}`, `]`, `<tool_call|>`, then `,` and
  short values), else the lowest allowed id of the full mask. When the request's budget is down to `reserve`
  tokens, every position is grammar-chosen, which closes the document within max_tokens; JSON whitespace is fixed
  by the grammar (no free whitespace), so nothing can pad the document either.
* When the grammar is complete (nothing more may follow, or it accepts and the canvas holds a stop token), the
  canvas is cut there and the reply ends with finish reason "stop".

The next canvas is denoised after the walked tokens enter the KV cache, so the model conditions on the valid text.
The cost is one extra LM-head pass (top-k over vocabulary chunks) per committing constrained row and a few matcher
calls per refused position; `benchmarks/bench_constraint.py` measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np

NUM_CANDIDATES = 8  # top-k ids per position that the walk may choose from when the argmax is refused


class Constraint:
    """One sequence's grammar state and its canvas walk. Not thread-safe: the engine thread alone uses it."""

    def __init__(self, matcher: llguidance.LLMatcher, preferred: Sequence[int], reserve: int) -> None:
        self.matcher = matcher
        self.preferred = list(preferred)  # grammar-chosen tokens, in order of preference (see the module doc)
        self.reserve = reserve  # tokens left at which every position is grammar-chosen, to close the document

    def commit(self, canvas: list[int], candidates: list[list[int]], budget: int) -> tuple[list[int], bool]:
        """Walk `canvas` (cut to at most `budget` tokens) under the grammar: returns the tokens to commit and
        whether they complete the document. The matcher has consumed exactly those tokens."""
        out: list[int] = []
        n = min(len(canvas), budget)
        while len(out) < n and not self.matcher.is_stopped():
            i = len(out)
            free = max(0, min(n, budget - self.reserve) - i)  # positions before the closing reserve
            run = self.matcher.validate_tokens(canvas[i : i + free]) if free else 0
            if run:
                self._consume(canvas[i : i + run])
                out.extend(canvas[i : i + run])
                continue
            token = next((t for t in candidates[i] if self.matcher.validate_tokens([t])), None) if free else None
            if token is None:
                token = self._grammar_token()
            self._consume([token])
            out.append(token)
        return out, self.matcher.is_stopped()

    def _consume(self, tokens: list[int]) -> None:
        if not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"grammar refused tokens it had allowed: {self.matcher.get_error()}")

    def _grammar_token(self) -> int:
        forced = self.matcher.compute_ff_tokens()
        if forced:
            return forced[0]
        for token in self.preferred:
            if self.matcher.validate_tokens([token]):
                return token
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits)
        if not len(allowed):
            raise RuntimeError(f"the grammar allows no token: {self.matcher.get_error()}")
        return int(allowed[0])
