"""Engine logprobs (engine/request.py Logprob) in OpenAI's shapes: chat's `logprobs.content` entries and the legacy
completions object. Each token is its own text (special tokens as written, e.g. `<turn|>`) with its bytes: a
byte-fallback token is its one byte, so that the bytes of a reply's entries spell its text even where a character
spans several tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from engine.request import BlockCommitted, Finished, Logprob
from server.text import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPieces:
    """Token id -> (text, bytes), decoded once per id and shared by every request."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if (piece := self._pieces.get(token_id)) is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            byte = _BYTE_TOKEN.fullmatch(self._tokenizer.hf.convert_ids_to_tokens(token_id))
            piece = self._pieces[token_id] = (text, [int(byte[1], 16)] if byte else list(text.encode()))
        return piece


def entries_of(event: BlockCommitted | Finished) -> tuple[Logprob, ...]:
    """The entries an update's event brings (a block's tokens, then any stop token); none for a finish."""
    return event.logprobs or () if isinstance(event, BlockCommitted) else ()


def chat_content(pieces: TokenPieces, entries: Iterable[Logprob]) -> list[dict[str, Any]]:
    """Chat's `choices[].logprobs.content`: token, logprob, bytes and top_logprobs per entry."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [entry(e.token_id, e.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]


def completion_logprobs(pieces: TokenPieces, entries: Iterable[Logprob], offset: int) -> dict[str, Any]:
    """The legacy object: tokens, token_logprobs, top_logprobs (token text -> logprob) and text_offset, each token's
    character offset in the choice's text, counted from `offset` (where the previous chunk's tokens ended)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = pieces(e.token_id)[0]
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({pieces(t)[0]: lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
