"""Text for the HTTP layer, free of HTTP and torch: chat prompts to token ids, and output token ids, streamed block by
block, to settled text deltas with Gemma 4's thought channel split out and stop strings applied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import AutoTokenizer

from server.tools import ToolCall, ToolCallSplitter

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNEL_OPEN, CHANNEL_CLOSE, THOUGHT_HEADER = "<|channel>", "<channel|>", "thought\n"
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """The checkpoint's tokenizer and chat template."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self.name_or_path: str = self._tokenizer.name_or_path
        self.vocab_size: int = len(self._tokenizer)
        # No token covers more characters: a text longer than max_model_len * this cannot fit (a bound, not a count).
        self.max_token_chars: int = max(len(t) for t in self._tokenizer.get_vocab())
        # What skip_special_tokens=True drops (<eos>, <turn|>, <|channel>, <|"|>, ...), as text.
        self.special_tokens: frozenset[str] = frozenset(
            token.content for token in self._tokenizer.added_tokens_decoder.values() if token.special
        )

    def info(self) -> dict[str, object]:
        """What GET /tokenizer_info shows (as vLLM's does: the class, special tokens and the chat template)."""
        t = self._tokenizer
        return {
            "tokenizer_class": type(t).__name__,
            "name_or_path": self.name_or_path,
            "vocab_size": self.vocab_size,
            **{name: getattr(t, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "special_tokens": sorted(self.special_tokens),
            "chat_template": t.chat_template,
        }

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without an added <bos>; special-token strings in it become their ids."""
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def hf(self) -> object:
        """The transformers tokenizer (for llguidance's view of the vocabulary)."""
        return self._tokenizer

    def chat_prompt_ids(
        self, messages: list[dict], enable_thinking: bool, tools: list[dict] | None = None
    ) -> list[int]:
        """Prompt ids for OpenAI-style messages (and tools) plus the generation prompt; ValueError for what cannot be
        rendered."""
        if not messages:
            raise ValueError("messages must not be empty")
        for i, message in enumerate(messages):
            _check_message(i, message)
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
            )
        except (TemplateError, TypeError, ValueError) as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from e
        return self.encode(text)  # the template writes <bos> itself


def _check_message(i: int, message: object) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object with a role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, not {role!r}")
    if isinstance(content, str) or (content is None and message.get("tool_calls")):
        return
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}]: content must be a string or a list of text parts")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported, not {kind!r}")


class IncrementalDetokenizer:
    """Token ids in, settled text out: text never splits a character and is never revised later.

    Only a sliding window is decoded (vLLM's scheme): ids[prefix_offset:read_offset] produced the text emitted last
    and stays as left context, so decoding it with the new ids and cutting off its old text gives the new text with
    word-boundary spaces right. Both offsets only move to where the decoded text had settled, i.e. character
    boundaries, so a byte-fallback run is never cut at the window's left edge.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = self._read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        old = self._decode(self._prefix_offset, self._read_offset)
        end = len(self._ids)
        text = self._decode(self._prefix_offset, end)
        if not final and text.endswith(_REPLACEMENT):
            # A character cut inside its byte-fallback run decodes to U+FFFD for each byte token of the run until the
            # run completes. Settle the text before the run, if its byte tokens begin there (a decode checks that).
            settled = text.rstrip(_REPLACEMENT)
            end -= len(text) - len(settled)
            if end <= self._read_offset or self._decode(self._prefix_offset, end) != settled:
                return ""
            text = settled
        if not final and len(text) <= len(old):
            return ""
        # Invalid bytes running on across read_offset turn emitted text into U+FFFD: then take the new ids alone.
        new = text[len(old) :] if text.startswith(old) else self._decode(self._read_offset, end)
        self._prefix_offset, self._read_offset = self._read_offset, end
        return new


class _Tails:
    """Length of the longest tail of a text that is a proper prefix of a pattern, i.e. may still grow into one."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._prefixes = frozenset(p[:k] for p in patterns for k in range(1, len(p)))
        self._longest = max(map(len, self._prefixes), default=0)

    def __call__(self, text: str) -> int:
        for k in range(min(len(text), self._longest), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0


class StopStrings:
    """Cuts text before the first stop string, holding back any tail that may still become one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = [stop for stop in dict.fromkeys(stops) if stop]
        self._tails = _Tails(self._stops)
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit); after a hit nothing more is emitted."""
        if self.matched is not None:
            return "", True
        text = self._held + text
        # The stop completed first wins, then the longest of those ending there: the same whatever the chunking.
        hits = [(start + len(stop), start, stop) for stop in self._stops if (start := text.find(stop)) >= 0]
        if hits:
            _, start, self.matched = min(hits)
            self._held = ""
            return text[:start], True
        cut = len(text) - self._tails(text)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class ReasoningSplitter:
    """Splits Gemma 4 output, decoded with its special tokens, into (reasoning, content) deltas.

    The model writes `<|channel>thought\\n{reasoning}<channel|>{answer}`; markers and header go to neither side and the
    special tokens in `strip` (e.g. Tokenizer.special_tokens: <turn|>, <eos>, ...) are deleted, so content matches a
    decode with skip_special_tokens=True. Matching is on text, as in vLLM's reasoning parsers: the same string spelled
    with ordinary tokens counts too.
    """

    def __init__(self, strip: Iterable[str] = ()) -> None:
        tokens = {CHANNEL_OPEN, CHANNEL_CLOSE, *strip}
        self._pattern = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))
        self._tails = _Tails(tokens)
        self._held = ""
        self._thinking = False
        self._header: str | None = None  # the thought channel's text while it may still be the "thought\n" header

    def push(self, text: str) -> tuple[str, str]:
        return _by_channel(self._split(text, final=False))

    def flush(self) -> tuple[str, str]:
        return _by_channel(self._split("", final=True))

    def _split(self, text: str, final: bool) -> list[tuple[bool, str]]:
        """(is_reasoning, text) pieces in stream order, for OutputText to stop the content without losing the order."""
        text = self._held + text
        pieces: list[tuple[bool, str]] = []
        start = 0
        for match in self._pattern.finditer(text):
            self._route(text[start : match.start()], pieces)
            start = match.end()
            if match.group() == CHANNEL_OPEN:
                self._thinking, self._header = True, ""
            elif match.group() == CHANNEL_CLOSE:
                self._thinking, self._header = False, None
        rest = text[start:]
        cut = len(rest) - (0 if final else self._tails(rest))
        self._held = rest[cut:]
        self._route(rest[:cut], pieces)  # at the end, a header still pending is dropped with the channel cut off
        return pieces

    def _route(self, text: str, pieces: list[tuple[bool, str]]) -> None:
        if self._header is not None:
            text = self._header + text
            if THOUGHT_HEADER.startswith(text):
                self._header = text
                return
            self._header = None
            text = text.removeprefix(THOUGHT_HEADER)
        if text:
            pieces.append((self._thinking, text))


def _by_channel(pieces: list[tuple[bool, str]]) -> tuple[str, str]:
    return "".join(t for thinking, t in pieces if thinking), "".join(t for thinking, t in pieces if not thinking)


@dataclass(frozen=True)
class TextDelta:
    content: str = ""
    reasoning: str = ""
    stopped: bool = False  # a stop string was hit: the choice ends, and nothing more comes
    tool_calls: tuple[ToolCall, ...] = ()


class OutputText:
    """One choice's output text: ids -> settled text -> (reasoning, content) -> stop strings on the content only."""

    def __init__(
        self, tokenizer: Tokenizer, stops: Iterable[str] = (), split_reasoning: bool = False, tool_calls: bool = False
    ) -> None:
        # The channel and tool-call markers are special tokens: keep specials in the text only when splitters remove
        # them again (tool calls need the chat reply's splitter too).
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=not split_reasoning)
        self._splitter = ReasoningSplitter(tokenizer.special_tokens) if split_reasoning else None
        self._tool_calls = ToolCallSplitter() if tool_calls and split_reasoning else None
        self._stops = StopStrings(stops)

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text (OpenAI's vLLM-extension `stop_reason`), if any."""
        return self._stops.matched

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        return self._emit(self._detokenizer.push(token_ids), final=False)

    def flush(self) -> TextDelta:
        return self._emit(self._detokenizer.flush(), final=True)

    def _emit(self, text: str, final: bool) -> TextDelta:
        if self._stops.matched is not None:
            return TextDelta(stopped=True)
        calls: list[ToolCall] = []
        if self._tool_calls is not None:
            text, calls = self._tool_calls.push(text, final)
        delta = self._split(text, final)
        return TextDelta(delta.content, delta.reasoning, delta.stopped, tuple(calls))

    def _split(self, text: str, final: bool) -> TextDelta:
        pieces = [(False, text)] if self._splitter is None else self._splitter._split(text, final)
        reasoning, content = [], []
        for thinking, piece in pieces:
            if thinking:
                reasoning.append(piece)
                continue
            emitted, stopped = self._stops.push(piece)
            content.append(emitted)
            if stopped:  # whatever follows the stop, reasoning included, is dropped
                return TextDelta("".join(content), "".join(reasoning), True)
        if final:
            content.append(self._stops.flush())
        return TextDelta("".join(content), "".join(reasoning), False)
