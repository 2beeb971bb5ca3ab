"""OpenAI request shapes (plus our `diffusion` extension) as pydantic models: validation here becomes a 400 that names
the parameter. Fields we cannot honour are refused, never silently ignored; fields outside the OpenAI schema are
accepted and logged, as vLLM does, because benchmark and evaluation clients send its extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator
from pydantic_core import PydanticCustomError

from engine.request import MAX_LOGPROBS
from server.tools import json_arguments

# Caps that real clients pass (evaluation harnesses send 5-6 stop strings and lists of prompts) while bounding work.
MAX_N = 16
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 512
MAX_PROMPTS = 256
MAX_CHOICES = 256  # prompts x n: every choice is an engine sequence, admitted at once
MAX_MESSAGES = 2048
INT64_MAX = 2**63 - 1
MAX_COMPLETION_LOGPROBS = 5  # the legacy API's cap, as OpenAI's
MAX_CACHE_SALT = 256  # characters: a tenant's name or a random key, not a document


def _json_number(value: Any) -> Any:
    """Numbers must be JSON numbers, as OpenAI requires: pydantic would otherwise take "5" for 5 and true for 1."""
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("number_type", "Input should be a number, not {kind}", {"kind": type(value).__name__})
    return value


def _json_numbers(values: Any) -> Any:
    """`_json_number` for a whole list of token ids at once (a Python call per id would be slow for long prompts)."""
    if isinstance(values, list) and any(isinstance(v, (bool, str)) for v in values):
        raise PydanticCustomError("number_type", "token ids should be numbers")
    return values


# Integral floats such as 8.0 stay accepted: JSON Schema, and so our declared schema, counts them as integers.
Int = Annotated[int, BeforeValidator(_json_number)]
Float = Annotated[float, BeforeValidator(_json_number)]
# vLLM's extension: prefix-cache pages are shared only between requests that send the same salt (README "Prefix
# caching").
CacheSalt = Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT)]


class InvalidParameter(ValueError):
    """Raised in a validator: becomes a 400 naming `param` (errors.py reads it from the validation error)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(InvalidParameter):
    """A known OpenAI parameter whose meaning we cannot honour; becomes a 400 naming `param`."""


def _lone_surrogate_path(data: Any) -> str | None:
    """The path ("messages.0.content") of the first string or key holding a lone surrogate, a JSON escape such
    as "\\ud800" that is no text: tokenizers raise on it and responses cannot encode it. Iterative: bodies nest."""
    todo: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return ".".join(map(str, path)) or "body"
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not _encodable(key):
                return ".".join(map(str, path)) or "body"
            if isinstance(item, (str, dict, list)):
                todo.append(((*path, key), item))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        if (path := _lone_surrogate_path(data)) is not None:
            raise InvalidParameter(path, f"{path}: the string contains a lone surrogate, which is not valid text")
        return data

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), BeforeValidator(_json_numbers)]


class DiffusionOptions(BaseModel):
    """Per-request diffusion controls, sent as `extra_body={"diffusion": {...}}`; unknown keys are an error. The
    options named in engine.request.DIFFUSION_OPTIONS reach SamplingParams by name (None: the default), and the engine
    checks their ranges; each description is also the `dgserve generate --<name>` help."""

    model_config = ConfigDict(extra="forbid")

    steps: Int | None = Field(None, description="denoising steps per canvas at most")
    entropy_bound: Float | None = Field(None, description="gamma of the entropy-bound acceptance rule")
    t_max: Float | None = Field(None, description="temperature of the schedule's first step")
    t_min: Float | None = Field(None, description="temperature the schedule falls towards on the last step")
    stability_threshold: Int | None = Field(
        None, description="equal argmax canvases needed before a canvas may stop early (0: no check)"
    )
    confidence_threshold: Float | None = Field(
        None, description="mean entropy (nats) below which a canvas may stop early"
    )
    stream_drafts: StrictBool | Literal["tokens"] = Field(
        False,
        description="stream the argmax canvas after every denoising step (over HTTP, 'tokens' adds each position's "
        "token text and state)",
    )
    canvas: Annotated[str, Field(min_length=1)] | TokenIds | None = Field(
        None, description="start the first canvas from this text or these ids instead of noise"
    )
    pinned: Annotated[list[tuple[Int, Int]], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="[start, end) positions of the canvas that stay fixed"
    )
    # None: the server's default (--stream-prefix)
    stream_prefix: StrictBool | None = Field(
        None, description="stream each canvas's settled leading tokens before it commits"
    )
    settle_steps: Int | None = Field(
        None, description="with stream_prefix: steps a leading position's argmax must stay the same to be settled"
    )
    settle_entropy: Float | None = Field(
        None, description="with stream_prefix: entropy (nats) a settling position must stay below"
    )

    @model_validator(mode="after")
    def _pins_need_a_canvas(self) -> DiffusionOptions:
        if self.pinned is not None and self.canvas is None:
            raise InvalidParameter("diffusion.pinned", "diffusion.pinned needs diffusion.canvas: the ids it pins")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM extension: usage on every chunk


StopField = (
    Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_STOP_STRINGS)
    ]
)


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints."""

    model: str | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    seed: Annotated[Int, Field(ge=0, le=INT64_MAX)] | None = None
    stop: StopField | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Float] | None = None
    user: str | None = None
    ignore_eos: StrictBool = False  # vLLM extension that benchmark clients send
    diffusion: DiffusionOptions | None = None
    response_format: dict[str, Any] | None = None  # checked and compiled in server/structured.py
    cache_salt: CacheSalt | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options", "stream_options is only allowed when stream is true")
        return self

    def refuse_unsupported(self) -> None:
        """Raise UnsupportedParameter for parameters whose meaning we would otherwise silently change."""
        if self.top_p not in (None, 1.0):
            raise UnsupportedParameter("top_p", "top_p is not supported by diffusion sampling; use temperature")
        if extra := self.model_extra or {}:
            if extra.get("top_k") not in (None, -1, 0):
                raise UnsupportedParameter("top_k", "top_k is not supported by diffusion sampling; use temperature")
            if extra.get("min_p") not in (None, 0, 0.0):
                raise UnsupportedParameter("min_p", "min_p is not supported by diffusion sampling")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise UnsupportedParameter(name, f"{name} is not supported by diffusion sampling")
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias", "logit_bias is not supported")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16
    suffix: str | None = None
    echo: StrictBool = False
    logprobs: Annotated[Int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None  # alternatives per token
    best_of: Int | None = None

    @model_validator(mode="after")
    def _bounded_choices(self) -> CompletionRequest:
        if (total := len(self.prompts) * self.n) > MAX_CHOICES:
            message = f"{len(self.prompts)} prompts x n={self.n} is {total} choices; at most {MAX_CHOICES} per request"
            raise InvalidParameter("n", message)
        return self

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix and self.response_format:
            raise UnsupportedParameter("suffix", "suffix cannot be combined with response_format")
        if self.suffix and self.diffusion and self.diffusion.canvas is not None:
            raise UnsupportedParameter("suffix", "suffix cannot be combined with diffusion.canvas: both set the canvas")
        if self.echo:  # with logprobs it would ask for prompt logprobs, which a diffusion model does not define
            raise UnsupportedParameter("echo", "echo is not supported (nor prompt logprobs with it)")
        if self.best_of not in (None, 1):
            raise UnsupportedParameter("best_of", "best_of > 1 is not supported")

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: alternatives per token, None for no logprobs."""
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    """Any content part: only text is served for now; images, audio and files are refused by name."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None  # the spec's minItems 1
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers
    name: str | None = None


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")

    enable_thinking: StrictBool = False


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None  # checked in server/structured.py, which names the exact parameter
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs requires logprobs: true")
        return self

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, message in enumerate(self.messages):
            if message.role == "function":
                raise UnsupportedParameter(f"messages[{i}].role", "role 'function' is deprecated; use 'tool'")
            if isinstance(message.content, list):
                for part in message.content:
                    if part.type != "text" or part.text is None:
                        raise UnsupportedParameter(
                            f"messages[{i}].content", f"content parts of type {part.type!r} are not supported yet"
                        )
        if self.response_format and self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedParameter("response_format", "response_format cannot be combined with a forced tool call")
        if self.audio is not None or (self.modalities and set(self.modalities) != {"text"}):
            raise UnsupportedParameter("modalities", "only text output is supported")

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: alternatives per token, None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def enable_thinking(self) -> bool:
        return bool(self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template takes them: text content, tool calls with their arguments as mappings."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content if isinstance(m.content, str) or m.content is None else [
                {"type": "text", "text": p.text} for p in m.content
            ]  # fmt: skip
            message: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.tool_calls:
                message["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]")
                                         for j, call in enumerate(m.tool_calls)]  # fmt: skip
            if m.role == "tool":
                message.update(tool_call_id=m.tool_call_id, name=m.name)
            out.append(message)
        return out


def _template_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise UnsupportedParameter(param, f"{param} must have a function with a name")
    try:
        arguments = json_arguments(function.get("arguments", "{}"))
    except ValueError:
        raise UnsupportedParameter(f"{param}.function.arguments", "arguments must be a JSON object") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}
