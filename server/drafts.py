"""Token drafts (`"diffusion": {"stream_drafts": "tokens"}`): each denoising step's argmax canvas as per-position
token text (empty for special tokens such as padding) plus a one-letter state per position, so a viewer can show
the text settling out of noise.

States, from the argmax canvases this stream carried (the engine's acceptance mask stays on the device):
`n` noise (a new token this step, or the canvas's first step), `a` just accepted (the same token as the step
before, new the step before that), `s` settled (the same token for two steps or more), `p` pinned (fixed for the
rest of the canvas: given by the request, or a settled prefix already streamed).
"""

from __future__ import annotations

from typing import Any

from server.text import Tokenizer


class TokenDrafts:
    """One choice's canvas history; a new canvas (step 1) starts a fresh one."""

    def __init__(self, tokenizer: Tokenizer, pieces: dict[int, str]) -> None:
        self._tokenizer, self._pieces = tokenizer, pieces  # pieces: id -> text, shared by every request
        self._last: list[int] = []
        self._stable: list[int] = []  # steps each position's token has stayed the same

    def payload(self, token_ids: list[int], step: int, pinned: tuple[tuple[int, int], ...] = ()) -> dict[str, Any]:
        if step == 1:
            self._last, self._stable = [], []
        stable = [
            self._stable[i] + 1 if i < len(self._last) and self._last[i] == t else 0 for i, t in enumerate(token_ids)
        ]
        self._last, self._stable = token_ids, stable
        marks = ["n" if k == 0 else "a" if k == 1 else "s" for k in stable]
        for start, end in pinned:
            marks[start:end] = "p" * len(marks[start:end])
        return {"tokens": [self._piece(t) for t in token_ids], "states": "".join(marks)}

    def _piece(self, token_id: int) -> str:
        if (piece := self._pieces.get(token_id)) is None:
            piece = self._pieces[token_id] = self._tokenizer.decode([token_id])
        return piece
