"""/v1/messages and /v1/messages/count_tokens, Anthropic's Messages API: a request -> the core's job (content
blocks to chat-template messages, `input_schema` tools to the chat grammars, `thinking` to Gemma 4's thought
channel), and its updates -> a `message` object or Anthropic's event stream. Errors on these routes are
Anthropic-shaped (server/errors.py)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from server.errors import OpenAIError
from server.protocol import (
    INT64_MAX,
    MAX_MESSAGES,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    DiffusionOptions,
    Float,
    Int,
    InvalidParameter,
    OpenAIModel,
)
from server.serving import ApiFields, Choice, Job, Sampling, Serving, Sse, Update
from server.structured import GrammarError, check_tools, tool_choice
from server.tools import ToolCall

logger = logging.getLogger(__name__)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | Annotated[list[dict[str, Any]], Field(min_length=1)]


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[Int, Field(ge=1)] | None = None


class CountTokensRequest(OpenAIModel):
    """What count_tokens takes: everything that shapes the prompt."""

    model: str | None = None
    messages: Annotated[list[AnthropicMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: str | Annotated[list[dict[str, Any]], Field(min_length=1)] | None = None
    tools: list[Any] | None = None  # checked like chat's in server/structured.py
    tool_choice: dict[str, Any] | None = None
    thinking: Thinking | None = None

    @property
    def thinking_enabled(self) -> bool:
        return self.thinking is not None and self.thinking.type != "disabled"


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[Int, Field(ge=1)]
    stop_sequences: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
                  Field(max_length=MAX_STOP_STRINGS)] | None
    ) = None  # fmt: skip
    temperature: Annotated[Float, Field(ge=0, le=1)] | None = None  # Anthropic's range
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = None
    metadata: dict[str, Any] | None = None
    stream: StrictBool = False
    # our extensions
    seed: Annotated[Int, Field(ge=0, le=INT64_MAX)] | None = None
    diffusion: DiffusionOptions | None = None

    def refuse_unsupported(self) -> None:
        if self.top_p not in (None, 1.0):
            raise InvalidParameter("top_p", "top_p: not supported by diffusion sampling; use temperature")
        if self.top_k not in (None, 0):
            raise InvalidParameter("top_k", "top_k: not supported by diffusion sampling; use temperature")


def _text(content: Any, param: str) -> str:
    """Text blocks (or a string) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameter(param, f"{param}: must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else None
            raise InvalidParameter(f"{param}.{j}.type", f"{param}.{j}: blocks of type {kind!r} are not supported here")
        texts.append(block["text"])
    return "".join(texts)


def template_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """System and content blocks -> chat-template messages: tool_use blocks become the assistant's tool calls, and
    tool_result blocks tool turns."""
    out: list[dict[str, Any]] = []
    if body.system is not None:
        out.append({"role": "system", "content": _text(body.system, "system")})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer it
    for i, message in enumerate(body.messages):
        blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
        text, calls = [], []
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "tool_use" and message.role == "assistant":
                call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
                if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, dict)):
                    raise InvalidParameter(where, f"{where}: a tool_use block needs an id, a name and an input object")
                names[call_id] = name
                calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            elif kind == "tool_result" and message.role == "user":
                call_id = block.get("tool_use_id")
                if call_id not in names:
                    raise InvalidParameter(f"{where}.tool_use_id", f"{where}: answers no earlier tool_use block")
                result = _text(block.get("content", ""), f"{where}.content")
                out.append({"role": "tool", "tool_call_id": call_id, "name": names[call_id], "content": result})
            elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
                continue  # the template drops earlier turns' thoughts
            else:
                raise InvalidParameter(f"{where}.type", f"{where}: {kind!r} blocks are not supported in "
                                       f"{message.role} messages")  # fmt: skip
        if text or calls or not any(b.get("type") == "tool_result" for b in blocks):
            turn: dict[str, Any] = {"role": message.role, "content": "".join(text)}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
    return out


def _chat_tools(tools: list[Any]) -> list[Any]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" or "input_schema" not in tool:
            raise InvalidParameter("tools", f"tools.{i}: only custom tools with an input_schema are supported")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool]:
    """Anthropic tool_choice -> (chat's tool_choice, parallel calls allowed)."""
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, False
    raise InvalidParameter("tool_choice", "tool_choice.type must be auto, any, tool or none")


def _param(param: str) -> str:
    return param.replace("].", ".").replace("[", ".").replace("]", "").replace(".function.parameters", ".input_schema")


def prompt(serving: Serving, body: CountTokensRequest) -> tuple[list[int], str | None, bool]:
    """(prompt ids, the grammar of a forced tool call, whether tools are offered); a 400 for what is malformed."""
    serving.check_model(body.model)
    try:
        if isinstance(body, MessagesRequest):
            body.refuse_unsupported()
        if ignored := body.ignored_fields():
            logger.warning("ignoring request fields outside the Messages schema: %s", ", ".join(ignored))
        messages = template_messages(body)
        chat_tools = _chat_tools(body.tools) if body.tools else None
        tools = check_tools(chat_tools) if chat_tools else {}
        forced, parallel = _chat_tool_choice(body.tool_choice)
        choice = tool_choice(forced, tools, parallel)
        grammar = serving.grammars.tool_calls(tools, choice) if choice.names else None
    except (GrammarError, InvalidParameter) as exc:
        raise OpenAIError(400, str(exc), "invalid_request", _param(exc.param)) from None
    offered = chat_tools if tools and forced != "none" else None
    return serving.chat_prompt_ids(messages, body.thinking_enabled, offered), grammar, bool(offered)


def messages_job(serving: Serving, body: MessagesRequest) -> Job:
    """Runs in a worker thread: grammars compile here, never on the event loop."""
    ids, grammar, offered = prompt(serving, body)
    api = MessagesApi(serving.model_name)
    sampling = Sampling(body.temperature, body.seed, tuple(body.stop_sequences or ()), diffusion=body.diffusion)
    return serving.job(api.id, api, sampling, [ids], body.max_tokens, stream=body.stream,
                       grammar=grammar, tool_calls=offered)  # fmt: skip


class MessagesApi:
    """One assistant message: thinking, text and tool_use blocks, in the order the model writes them."""

    fields = ApiFields("messages", "max_tokens")

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.id = f"msg_{uuid.uuid4().hex}"
        self._blocks = 0  # content blocks started (streaming)
        self._open: str | None = None  # the kind of the block still open: "thinking" or "text"

    def _message(self, choice: Choice, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        stop = choice.text.matched_stop if done else None
        reason = "stop_sequence" if stop is not None else STOP_REASONS.get(choice.finish_reason or "", "end_turn")
        # Anthropic's input_tokens leave out the tokens read from the cache: the prompt is their sum. The prefix cache
        # writes as it encodes, so nothing counts as a cache write (Anthropic's writes are the breakpoints a client
        # sets). message_start comes before the cache lookup: its usage has no hit yet, and message_delta's replaces it.
        cached = choice.cached_tokens
        usage = {"input_tokens": len(choice.request.prompt_ids) - cached, "output_tokens": choice.completion_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}  # fmt: skip
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name, "content": content,
                "stop_reason": reason if done else None, "stop_sequence": stop, "usage": usage}  # fmt: skip

    @staticmethod
    def _tool_use(call: ToolCall) -> dict[str, Any]:
        return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
                "input": json.loads(call.arguments)}  # fmt: skip

    def body(self, job: Job) -> dict[str, Any]:
        (c,) = job.choices
        content: list[dict[str, Any]] = []
        if thinking := "".join(c.reasoning):
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if (text := "".join(c.content)) or not c.tool_calls:
            content.append({"type": "text", "text": text})
        content += [self._tool_use(call) for call in c.tool_calls]
        return self._message(c, content, done=True)

    @staticmethod
    def _event(kind: str, **fields: Any) -> Sse:
        return {"event": kind, "data": json.dumps({"type": kind, **fields}, ensure_ascii=False)}

    def opening(self, job: Job) -> Iterable[Sse]:
        yield self._event("message_start", message=self._message(job.choices[0], [], done=False))

    def _start(self, kind: str, block: dict[str, Any]) -> Iterable[Sse]:
        yield from self._stop()
        yield self._event("content_block_start", index=self._blocks, content_block=block)
        self._blocks += 1
        self._open = kind

    def _stop(self) -> Iterable[Sse]:
        if self._open is not None:
            self._open = None
            yield self._event("content_block_stop", index=self._blocks - 1)

    def update(self, job: Job, choice: Choice, update: Update) -> Iterable[Sse]:
        if update.reasoning:
            if self._open != "thinking":
                yield from self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            delta = {"type": "thinking_delta", "thinking": update.reasoning}
            yield self._event("content_block_delta", index=self._blocks - 1, delta=delta)
        if update.content or (update.finish and not self._blocks and not update.tool_calls):
            if self._open != "text":
                yield from self._start("text", {"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": update.content}
            yield self._event("content_block_delta", index=self._blocks - 1, delta=delta)
        for call in update.tool_calls:
            yield from self._start("tool_use", self._tool_use(call) | {"input": {}})
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            yield self._event("content_block_delta", index=self._blocks - 1, delta=delta)
        if update.finish is not None:
            yield from self._stop()

    def closing(self, job: Job) -> Iterable[Sse]:
        message = self._message(job.choices[0], [], done=True)
        delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        yield self._event("message_delta", delta=delta, usage=message["usage"])
        yield self._event("message_stop")

    def failed(self, job: Job, message: str) -> Iterable[Sse]:
        yield self._event("error", error={"type": "api_error", "message": message})
