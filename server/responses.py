"""/v1/responses, OpenAI's Responses API: a request -> the core's job (input items to chat-template messages,
function tools and text.format to the chat grammars), and its updates -> a `response` object or its event stream.

Stored responses (`store`, default true, as OpenAI's) live in a `ResponseStore`: in memory, least recently used first
out, bounded by count and by bytes. `previous_response_id` continues a stored conversation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StrictBool

from engine.request import MAX_LOGPROBS, Logprob
from server.errors import OpenAIError
from server.logprobs import TokenPieces, chat_content, entries_of
from server.protocol import (
    INT64_MAX,
    MAX_MESSAGES,
    CacheSalt,
    DiffusionOptions,
    Float,
    Int,
    InvalidParameter,
    OpenAIModel,
)
from server.serving import ApiFields, Choice, Job, Sampling, Serving, Sse, Update
from server.structured import GrammarError, check_tools, tool_choice
from server.tools import ToolCall, json_arguments

logger = logging.getLogger(__name__)

STORE_MAX_RESPONSES = 1024
STORE_MAX_BYTES = 64 * 2**20
MAX_METADATA_KEYS = 16
OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the one `include` served


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Any], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    tools: list[Any] | None = None  # function tools, checked like chat's in server/structured.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    text: dict[str, Any] | None = None  # {"format": ...}: checked like chat's response_format
    include: list[str] | None = None  # only OUTPUT_LOGPROBS
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool = True
    background: StrictBool = False
    previous_response_id: str | None = None
    stream: StrictBool = False
    reasoning: dict[str, Any] | None = None
    conversation: Any = None
    truncation: str | None = None
    user: str | None = None
    # our extensions, sent as extra_body
    seed: Annotated[Int, Field(ge=0, le=INT64_MAX)] | None = None
    diffusion: DiffusionOptions | None = None
    cache_salt: CacheSalt | None = None

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: top_logprobs alternatives when the output text's logprobs are included."""
        return (self.top_logprobs or 0) if OUTPUT_LOGPROBS in (self.include or ()) else None

    def refuse_unsupported(self) -> None:
        refusals = {
            "background": (self.background, "background responses are not supported; leave background false"),
            "top_p": (self.top_p not in (None, 1.0), "top_p is not supported by diffusion sampling; use temperature"),
            "include": (
                bool(set(self.include or ()) - {OUTPUT_LOGPROBS}),
                f"include supports only {OUTPUT_LOGPROBS!r} (encrypted reasoning, search results, ... are not served)",
            ),
            "conversation": (
                self.conversation is not None,
                "conversations are not supported; use previous_response_id",
            ),
            "reasoning": (
                bool(self.reasoning and self.reasoning.get("effort") not in (None, "none")),
                "reasoning effort is not supported",
            ),
            "truncation": (self.truncation not in (None, "disabled"), "only truncation 'disabled' is supported"),
        }
        for param, (refused, message) in refusals.items():
            if refused:
                raise InvalidParameter(param, message)
        if self.metadata is not None and len(self.metadata) > MAX_METADATA_KEYS:
            raise InvalidParameter("metadata", f"metadata holds at most {MAX_METADATA_KEYS} keys")


@dataclass(frozen=True, slots=True)
class Stored:
    body: dict[str, Any]  # what GET returns
    messages: list[dict[str, Any]]  # the conversation so far, instructions left out (they do not carry over)
    size: int


class ResponseStore:
    """Stored responses, least recently used out first once over `max_count` or `max_bytes` (JSON bytes)."""

    def __init__(self, max_count: int = STORE_MAX_RESPONSES, max_bytes: int = STORE_MAX_BYTES) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # job building reads it in worker threads

    def put(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(body)) + len(json.dumps(messages))
        if size > self.max_bytes:
            logger.warning("response %s is larger than the whole store (%d bytes): not stored", body["id"], size)
            return
        with self._lock:
            self._items[body["id"]] = Stored(body, messages, size)
            self._bytes += size
            while len(self._items) > self.max_count or self._bytes > self.max_bytes:
                self._bytes -= self._items.popitem(last=False)[1].size

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            if (item := self._items.get(response_id)) is not None:
                self._items.move_to_end(response_id)
            return item

    def delete(self, response_id: str) -> bool:
        with self._lock:
            item = self._items.pop(response_id, None)
            if item is not None:
                self._bytes -= item.size
            return item is not None


class ResponsesApi:
    """One response: its output items, built from the choice's updates, and OpenAI's stream event grammar."""

    fields = ApiFields("input", "max_output_tokens", "top_logprobs")

    def __init__(self, body: ResponsesRequest, model_name: str, store: ResponseStore,
                 messages: list[dict[str, Any]], text_format: dict[str, Any], pieces: TokenPieces) -> None:  # fmt: skip
        self.request, self.model_name, self.store, self.pieces = body, model_name, store, pieces
        self.logprobs = body.num_logprobs is not None  # output_text parts carry their tokens' entries
        self.messages = messages  # the conversation this reply continues, for the store
        self.text_format = text_format
        self.id = f"resp_{uuid.uuid4().hex}"
        self._message_id = f"msg_{uuid.uuid4().hex}"
        self._sequence = 0
        self._message_open = False
        self._items: list[dict[str, Any]] = []  # output items done so far (streaming)

    # --- the response object ------------------------------------------------------------------------------------------

    def response(self, job: Job, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.request
        (choice,) = job.choices
        incomplete = status == "incomplete"
        done = status in ("completed", "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": job.created, "status": status,
            "completed_at": int(time.time()) if done else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": self.model_name,
            "output": output, "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id, "reasoning": None, "store": r.store,
            "temperature": 1.0 if r.temperature is None else r.temperature, "text": {"format": self.text_format},
            "tool_choice": r.tool_choice or "auto", "tools": r.tools or [], "top_p": 1.0, "truncation": "disabled",
            "usage": self._usage(job, choice) if done else None, "user": r.user, "metadata": r.metadata or {},
            "background": False,
        }  # fmt: skip

    @staticmethod
    def _usage(job: Job, choice: Choice) -> dict[str, Any]:
        prompt, output = len(choice.request.prompt_ids), choice.completion_tokens
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output}  # fmt: skip

    @staticmethod
    def _status(choice: Choice) -> str:
        return "incomplete" if choice.finish_reason == "length" else "completed"

    def _logprobs(self, entries: Iterable[Logprob]) -> list[dict[str, Any]]:
        return chat_content(self.pieces, entries) if self.logprobs else []

    def _message(self, text: str, status: str, entries: Iterable[Logprob] = ()) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": self._logprobs(entries)}]
        return {"id": self._message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def _call(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        return {"id": f"fc_{call.id.removeprefix('call_')}", "type": "function_call", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": status}  # fmt: skip

    def _output(self, choice: Choice) -> list[dict[str, Any]]:
        text = "".join(choice.content)
        message = [self._message(text, self._status(choice), choice.logprobs)] if text or not choice.tool_calls else []
        return message + [self._call(call) for call in choice.tool_calls]

    def _finish(self, job: Job, output: list[dict[str, Any]]) -> dict[str, Any]:
        (choice,) = job.choices
        body = self.response(job, self._status(choice), output)
        if self.request.store:
            reply: dict[str, Any] = {"role": "assistant", "content": "".join(choice.content)}
            if choice.tool_calls:
                reply["tool_calls"] = [_template_call(call.id, call.name, call.arguments) for call in choice.tool_calls]
            self.store.put(body, [*self.messages, reply])
        return body

    # --- the translator -----------------------------------------------------------------------------------------------

    def body(self, job: Job) -> dict[str, Any]:
        return self._finish(job, self._output(job.choices[0]))

    def _event(self, kind: str, **fields: Any) -> Sse:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return {"event": kind, "data": json.dumps(event, ensure_ascii=False)}

    def opening(self, job: Job) -> Iterable[Sse]:
        yield self._event("response.created", response=self.response(job, "in_progress", []))
        yield self._event("response.in_progress", response=self.response(job, "in_progress", []))

    def _open_message(self) -> Iterable[Sse]:
        self._message_open = True
        item = self._message("", "in_progress") | {"content": []}
        yield self._event("response.output_item.added", output_index=len(self._items), item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._event("response.content_part.added", item_id=self._message_id, output_index=len(self._items),
                          content_index=0, part=part)  # fmt: skip

    def _close_message(self, choice: Choice) -> Iterable[Sse]:
        self._message_open = False
        text, at = "".join(choice.content), {"item_id": self._message_id, "output_index": len(self._items)}
        message = self._message(text, self._status(choice), choice.logprobs)
        logprobs = message["content"][0]["logprobs"]
        yield self._event("response.output_text.done", **at, content_index=0, text=text, logprobs=logprobs)
        yield self._event("response.content_part.done", **at, content_index=0, part=message["content"][0])
        yield self._event("response.output_item.done", output_index=len(self._items), item=message)
        self._items.append(message)

    def update(self, job: Job, choice: Choice, update: Update) -> Iterable[Sse]:
        entries = entries_of(update.event)
        if update.content or (entries and self._message_open):  # a delta carries its tokens' entries
            if not self._message_open:
                yield from self._open_message()
            yield self._event("response.output_text.delta", item_id=self._message_id, output_index=len(self._items),
                              content_index=0, delta=update.content, logprobs=self._logprobs(entries))  # fmt: skip
        if update.tool_calls and self._message_open:
            yield from self._close_message(choice)
        for call in update.tool_calls:
            item, at = self._call(call), {"item_id": self._call(call)["id"], "output_index": len(self._items)}
            yield self._event("response.output_item.added", output_index=len(self._items),
                              item=item | {"arguments": "", "status": "in_progress"})  # fmt: skip
            yield self._event("response.function_call_arguments.delta", **at, delta=call.arguments)
            yield self._event("response.function_call_arguments.done", **at, arguments=call.arguments)
            yield self._event("response.output_item.done", output_index=len(self._items), item=item)
            self._items.append(item)
        if update.finish is not None and (self._message_open or not self._items):
            if not self._message_open:
                yield from self._open_message()  # a reply with no text and no calls is still one (empty) message
            yield from self._close_message(choice)

    def closing(self, job: Job) -> Iterable[Sse]:
        body = self._finish(job, self._items)
        yield self._event(f"response.{body['status']}", response=body)

    def failed(self, job: Job, message: str) -> Iterable[Sse]:
        body = self.response(job, "failed", self._items) | {"error": {"code": "server_error", "message": message}}
        yield self._event("response.failed", response=body)


def _template_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json_arguments(arguments)}}


def _text(content: Any, param: str, kinds: tuple[str, ...]) -> str:
    """A message's content as text: a string, or parts of the given text types."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidParameter(param, f"{param} must be a string or a non-empty list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise InvalidParameter(f"{param}[{j}]", f"content parts of type {kind!r} are not supported here; "
                                   f"use {' or '.join(kinds)}")  # fmt: skip
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | list[Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items, after a stored conversation, -> chat-template messages (function calls join their
    assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    # call_id -> function name, for the tool turn that answers it
    names = {c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls", ())}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameter(where, f"{where} must be an input item object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidParameter(f"{where}.role", "role must be user, system, developer or assistant")
            kinds = ("output_text", "input_text") if role == "assistant" else ("input_text",)
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content", kinds)})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise InvalidParameter(where, f"{where}: a function_call needs a call_id and a name")
            try:
                call = _template_call(call_id, name, arguments)
            except ValueError:
                raise InvalidParameter(f"{where}.arguments", "arguments must be a JSON object") from None
            names[call_id] = name
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if call_id not in names:
                raise InvalidParameter(f"{where}.call_id", f"{where}.call_id answers no function_call before it")
            text = output if isinstance(output, str) else _text(output, f"{where}.output", ("input_text",))
            messages.append({"role": "tool", "tool_call_id": call_id, "name": names[call_id], "content": text})
        elif kind == "reasoning":
            continue  # our replies carry none; a client may echo another model's: the template has no place for it
        else:
            raise InvalidParameter(f"{where}.type", f"input items of type {kind!r} are not supported")
    return messages


def _chat_tools(tools: list[Any]) -> list[Any]:
    """Responses function tools -> chat's {"type": "function", "function": {...}}; built-in tools are refused."""
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidParameter("tools", f"tools[{i}]: only function tools are supported, not {kind!r}")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    raise InvalidParameter("tool_choice", 'tool_choice must be "none", "auto", "required" or a named function')


def _response_format(text: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """text.format -> (chat's response_format, the format the response echoes)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise InvalidParameter("text.format", "text.format must be an object")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or "schema" not in fmt:
            raise InvalidParameter("text.format", "a json_schema format needs a name and a schema")
        return {"type": "json_schema", "json_schema": {"name": fmt["name"], "schema": fmt["schema"]}}, fmt
    if fmt.get("type") not in ("text", "json_object"):
        raise InvalidParameter("text.format.type", "text.format type must be text, json_object or json_schema")
    return {"type": fmt["type"]}, fmt


def _param(param: str) -> str:
    """Chat's parameter names, as this API spells them."""
    return param.replace("response_format.json_schema.schema", "text.format.schema").replace(
        "response_format", "text.format"
    )


def responses_job(serving: Serving, store: ResponseStore, body: ResponsesRequest) -> Job:
    """Runs in a worker thread: grammars compile here, never on the event loop."""
    serving.check_model(body.model)
    try:
        body.refuse_unsupported()
        if ignored := body.ignored_fields():
            logger.warning("ignoring request fields outside the Responses schema: %s", ", ".join(ignored))
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            if (stored := store.get(body.previous_response_id)) is None:
                raise OpenAIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                                  "previous_response_not_found", "previous_response_id")  # fmt: skip
            history = stored.messages
        messages = [*history, *input_messages(body.input, history)]
        tools = check_tools(_chat_tools(body.tools)) if body.tools else {}
        chat_tools = _chat_tools(body.tools) if body.tools else None
        choice = tool_choice(_chat_tool_choice(body.tool_choice), tools, body.parallel_tool_calls)
        response_format, echoed = _response_format(body.text)
        if choice.names:
            grammar = serving.grammars.tool_calls(tools, choice)
        else:
            grammar = serving.grammars.response_format(response_format)
    except (GrammarError, InvalidParameter) as exc:
        raise OpenAIError(400, str(exc), "invalid_request", _param(exc.param)) from None
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    offered = chat_tools if tools and body.tool_choice != "none" else None
    ids = serving.chat_prompt_ids([*system, *messages], False, offered, "input")
    api = ResponsesApi(body, serving.model_name, store, messages, echoed, serving.token_pieces)
    sampling = Sampling(body.temperature, body.seed, diffusion=body.diffusion, logprobs=body.num_logprobs)
    return serving.job(api.id, api, sampling, [ids], body.max_output_tokens, stream=body.stream,
                       grammar=grammar, tool_calls=bool(offered), cache_salt=body.cache_salt)  # fmt: skip
