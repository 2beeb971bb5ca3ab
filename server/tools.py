"""Gemma 4 tool calls in the model's output: `<|tool_call>call:NAME{key:VALUE,...}<tool_call|>`, with strings between
`<|"|>` tokens and bare keys, read from text decoded with its special tokens kept, into OpenAI `tool_calls`."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL = re.compile(r"call:([A-Za-z0-9_.-]{1,64})(\{.*\})", re.DOTALL)
_SCALAR = re.compile(r"[^,}\]]*")


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return out if index is None else {"index": index, **out}


class ToolCallSplitter:
    """Text with special tokens in, (text outside calls, completed calls) out. An open call, or a tail that may still
    become the opening marker, is held until it completes; a span that does not parse stays text."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        text = self._held + text
        self._held = ""
        out, calls = [], []
        while text:
            start = text.find(CALL_OPEN)
            if start < 0:
                keep = 0 if final else _open_tail(text)
                out.append(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
                break
            out.append(text[:start])
            end = text.find(CALL_CLOSE, start)
            if end < 0:
                if final:
                    out.append(text[start:])
                else:
                    self._held = text[start:]
                break
            body = text[start + len(CALL_OPEN) : end]
            call = parse_call(body)
            if call is None:
                out.append(text[start : end + len(CALL_CLOSE)])
            else:
                calls.append(call)
            text = text[end + len(CALL_CLOSE) :]
        return "".join(out), calls


def _open_tail(text: str) -> int:
    for k in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return k
    return 0


def parse_call(body: str) -> ToolCall | None:
    """`call:NAME{...}` -> a ToolCall with JSON arguments, or None if it is not one."""
    match = _CALL.fullmatch(body.strip())
    if match is None:
        return None
    try:
        arguments, end = _value(match.group(2), 0)
    except (ValueError, IndexError):
        return None
    if end != len(match.group(2)) or not isinstance(arguments, dict):
        return None
    return ToolCall(match.group(1), json.dumps(arguments, ensure_ascii=False))


def _value(text: str, i: int) -> tuple[Any, int]:
    if text.startswith(QUOTE, i):
        end = text.index(QUOTE, i + len(QUOTE))
        return text[i + len(QUOTE) : end], end + len(QUOTE)
    if text[i] in "{[":
        close = "}" if text[i] == "{" else "]"
        items: list[Any] = []
        obj: dict[str, Any] = {}
        i += 1
        while text[i] != close:
            if close == "}":
                colon = text.index(":", i)
                obj[text[i:colon]], i = _value(text, colon + 1)
            else:
                item, i = _value(text, i)
                items.append(item)
            if text[i] == ",":
                i += 1
            elif text[i] != close:
                raise ValueError("expected , or a closing bracket")
        return (obj if close == "}" else items), i + 1
    scalar = _SCALAR.match(text, i).group()
    return json.loads(scalar), i + len(scalar)


def json_arguments(arguments: Any) -> dict[str, Any]:
    """An assistant message's `function.arguments` (a JSON string, as OpenAI sends it) as the template's mapping."""
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(value, dict):
        raise ValueError("function.arguments must be a JSON object")
    return value
