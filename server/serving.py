"""Requests to engine jobs, engine events to OpenAI responses: one pipeline for completions and chat.

validate -> prompt ids and SamplingParams per choice -> admit every choice (errors become real status codes before
any 200) -> stream one SSE chunk per committed block, or collect. A client that goes away aborts its engine jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from engine.async_engine import AsyncEngine, RequestStream
from engine.constraint import Constraint
from engine.request import (
    BlockCommitted,
    CanvasInit,
    ContextLengthError,
    Draft,
    EngineDeadError,
    EngineEvent,
    Failed,
    Finished,
    InvalidRequestError,
    Logprob,
    QueueFullError,
    SamplingParams,
)
from server.drafts import TokenDrafts
from server.errors import OpenAIError, error_body
from server.logprobs import TokenPieces, chat_content, completion_logprobs
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidParameter,
    SamplingFields,
    UnsupportedParameter,
)
from server.structured import GrammarError, Grammars, check_tools, tool_choice
from server.text import OutputText, Tokenizer
from server.tools import ToolCall

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Choice:
    """One (prompt, sample) pair: its engine job and the text it has produced."""

    index: int
    engine_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: OutputText
    constraint: Constraint | None = None
    canvas: CanvasInit | None = None
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False  # the role chunk went out (chat streaming)
    logprobs: list[Logprob] = field(default_factory=list)  # every entry so far (params.logprobs set)
    unsent: list[Logprob] = field(default_factory=list)  # entries no chunk has carried yet (streaming)
    text_offset: int = 0  # characters the streamed entries' tokens spell (completions' text_offset)

    def take_unsent(self) -> list[Logprob]:
        entries, self.unsent = self.unsent, []
        return entries


class CompletionFormat:
    """How /v1/completions writes a choice: text, and the legacy logprobs object."""

    object, chunk_object = "text_completion", "text_completion"
    opens_with_role = False  # no first chunk before any text

    def __init__(self, pieces: TokenPieces) -> None:
        self.pieces = pieces

    def choice(self, c: Choice) -> dict[str, Any]:
        logprobs = completion_logprobs(self.pieces, c.logprobs, 0) if c.params.logprobs is not None else None
        return {"index": c.index, "text": "".join(c.content), "logprobs": logprobs, "finish_reason": c.finish_reason}

    def chunk_choice(self, c: Choice, content: str, reasoning: str, finish: str | None, calls: int) -> dict[str, Any]:
        logprobs = None
        if c.params.logprobs is not None:
            logprobs = completion_logprobs(self.pieces, c.take_unsent(), c.text_offset)
            c.text_offset += sum(map(len, logprobs["tokens"]))
        return {"index": c.index, "text": content, "logprobs": logprobs, "finish_reason": finish}


class ChatFormat:
    """How /v1/chat/completions writes a choice: an assistant message with reasoning and tool calls; streamed, the
    role first, then content, reasoning and tool-call deltas."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    opens_with_role = True

    def __init__(self, pieces: TokenPieces) -> None:
        self.pieces = pieces

    def _logprobs(self, c: Choice, entries: list[Logprob]) -> dict[str, Any] | None:
        if c.params.logprobs is None:
            return None
        return {"content": chat_content(self.pieces, entries), "refusal": None}

    def choice(self, c: Choice) -> dict[str, Any]:
        content = "".join(c.content)
        message: dict[str, Any] = {"role": "assistant", "content": content or None if c.tool_calls else content,
                                   "refusal": None}  # fmt: skip
        if reasoning := "".join(c.reasoning):
            message["reasoning_content"] = reasoning
        if c.tool_calls:
            message["tool_calls"] = [call.openai() for call in c.tool_calls]
        return {"index": c.index, "message": message, "logprobs": self._logprobs(c, c.logprobs),
                "finish_reason": c.finish_reason}  # fmt: skip

    def chunk_choice(self, c: Choice, content: str, reasoning: str, finish: str | None, calls: int) -> dict[str, Any]:
        """`calls`: how many of the choice's latest tool calls this chunk carries."""
        delta: dict[str, Any] = {}
        if not c.started:
            c.started = True
            delta = {"role": "assistant", "content": ""}
        if content:
            delta["content"] = delta.get("content", "") + content
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            first = len(c.tool_calls) - calls
            delta["tool_calls"] = [call.openai(first + i) for i, call in enumerate(c.tool_calls[first:])]
        return {
            "index": c.index,
            "delta": delta,
            "logprobs": self._logprobs(c, c.take_unsent()),
            "finish_reason": finish,
        }


@dataclass(slots=True)
class Job:
    """Everything one HTTP request runs."""

    request_id: str
    format: CompletionFormat | ChatFormat
    body: SamplingFields
    choices: list[Choice]
    arrival: float
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_seen: bool = False
    first_block_seen: bool = False

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.prompt_ids) for c in self.choices if c.index % self.body.n == 0)  # each prompt once
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Serving:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        grammars: Grammars,
        metrics: Metrics,
        model_name: str,
        default_max_tokens: int,
        stream_prefix: bool = False,  # diffusion.stream_prefix when a request leaves it unset
    ) -> None:
        self.engine, self.tokenizer, self.grammars, self.metrics = engine, tokenizer, grammars, metrics
        self.model_name, self.default_max_tokens, self.stream_prefix = model_name, default_max_tokens, stream_prefix
        self.max_model_len, self.vocab_size = engine.info.max_model_len, engine.info.vocab_size
        self.canvas_length = engine.info.canvas_length
        self._pieces: dict[int, str] = {}  # token id -> its text, for token drafts
        self.token_pieces = TokenPieces(tokenizer)  # token id -> its text and bytes, for logprobs

    # --- request -> job ---------------------------------------------------------------------------------------------

    def _check_common(self, body: SamplingFields) -> None:
        if body.model is not None and body.model != self.model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist.", "model_not_found", "model")
        try:
            body.refuse_unsupported()
        except UnsupportedParameter as exc:
            raise OpenAIError(400, str(exc), "unsupported_parameter", exc.param) from None
        if ignored := body.ignored_fields():
            logger.warning("ignoring request fields outside the OpenAI schema: %s", ", ".join(ignored))

    def _choices(
        self,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        param: str,
        split: bool,
        grammar: str | None = None,
        tool_calls: bool = False,
        canvas: CanvasInit | None = None,
    ) -> list[Choice]:
        canvas = canvas or self._warm_start(body)
        choices = []
        for p, ids in enumerate(prompts):
            budget = max_tokens or max(1, min(self.default_max_tokens, self.max_model_len - len(ids)))
            if len(ids) + budget > self.max_model_len:
                raise OpenAIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{budget} output tokens and your prompt contains {len(ids)} tokens.",
                    "context_length_exceeded",
                    param,
                )
            for sample in range(body.n):
                params = self._sampling_params(body, budget, sample)
                index = p * body.n + sample
                text = OutputText(self.tokenizer, body.stop_strings, split_reasoning=split, tool_calls=tool_calls)
                constraint = None if grammar is None else self.grammars.constraint(grammar, budget)
                choices.append(Choice(index, "", ids, params, text, constraint, canvas))
        return choices

    def _warm_start(self, body: SamplingFields) -> CanvasInit | None:
        """diffusion.canvas and diffusion.pinned as the first canvas's start (the engine checks them)."""
        d = body.diffusion
        if d is None or d.canvas is None:
            return None
        ids = self.tokenizer.encode(d.canvas) if isinstance(d.canvas, str) else d.canvas
        return CanvasInit(tuple(ids), tuple(d.pinned or ()))

    def _infill(self, suffix: str, max_tokens: int | None) -> tuple[CanvasInit, int]:
        """The canvas of an infill and the middle's length: the suffix's ids pinned right after a middle of
        max_tokens positions, or of all the canvas has left beside the suffix when that is fewer."""
        ids = self.tokenizer.encode(suffix)
        room = self.canvas_length - len(ids)
        if room < 1:
            raise OpenAIError(400, f"suffix is {len(ids)} tokens; with the middle it must fit one canvas of "
                              f"{self.canvas_length} tokens, so at most {self.canvas_length - 1}", "invalid_request",
                              "suffix")  # fmt: skip
        middle = min(max_tokens or room, room)
        return CanvasInit((None,) * middle + tuple(ids), ((middle, middle + len(ids)),)), middle

    def _sampling_params(self, body: SamplingFields, max_tokens: int, sample: int) -> SamplingParams:
        d = body.diffusion
        settle = {name: getattr(d, name) for name in ("settle_steps", "settle_entropy") if d and getattr(d, name)}
        return SamplingParams(
            max_tokens=max_tokens,
            stop_token_ids=() if body.ignore_eos else None,
            max_denoising_steps=d and d.steps,
            entropy_bound=d and d.entropy_bound,
            t_max=d and d.t_max,
            t_min=d and d.t_min,
            stability_threshold=d and d.stability_threshold,
            confidence_threshold=d and d.confidence_threshold,
            temperature=1.0 if body.temperature is None else body.temperature,
            seed=None if body.seed is None else (body.seed + sample) % 2**63,  # n samples must differ
            stream_drafts=bool(d and d.stream_drafts),
            stream_prefix=self.stream_prefix if d is None or d.stream_prefix is None else d.stream_prefix,
            logprobs=body.num_logprobs,
            **settle,
        )

    def completion_job(self, body: CompletionRequest, request_id: str) -> Job:
        """Runs in a worker thread: a response_format grammar compiles here, never on the event loop."""
        self._check_common(body)
        prompts = []
        for prompt in body.prompts:
            # No token spans more than max_token_chars characters (x2 for normalisation): longer text cannot fit.
            if isinstance(prompt, str) and len(prompt) > 2 * self.max_model_len * self.tokenizer.max_token_chars:
                raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                  "prompt is longer", "context_length_exceeded", "prompt")  # fmt: skip
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise OpenAIError(400, "the prompt encodes to no tokens", "invalid_prompt", "prompt")
            if bad := [t for t in ids if t >= self.vocab_size]:
                raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary", "invalid_prompt", "prompt")
            prompts.append(ids)
        try:
            grammar = self.grammars.response_format(body.response_format) if body.response_format else None
        except (GrammarError, InvalidParameter) as exc:
            raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None
        canvas, max_tokens = None, body.max_tokens
        if body.suffix:
            canvas, max_tokens = self._infill(body.suffix, max_tokens)
        choices = self._choices(body, prompts, max_tokens, "prompt", False, grammar, canvas=canvas)
        return Job(request_id, CompletionFormat(self.token_pieces), body, choices, time.monotonic())

    def chat_job(self, body: ChatCompletionRequest, request_id: str) -> Job:
        """Runs in a worker thread: grammars compile here, never on the event loop."""
        self._check_common(body)
        try:
            tools = check_tools(body.tools) if body.tools is not None else {}
            choice = tool_choice(body.tool_choice, tools, body.parallel_tool_calls)
            if choice.names:
                grammar = self.grammars.tool_calls(tools, choice)
            else:
                grammar = self.grammars.response_format(body.response_format) if body.response_format else None
            messages = body.template_messages()
        except (GrammarError, InvalidParameter) as exc:
            raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None
        offered = body.tools if tools and body.tool_choice != "none" else None
        try:
            ids = self.tokenizer.chat_prompt_ids(messages, body.enable_thinking, offered)
        except ValueError as exc:
            raise OpenAIError(400, f"cannot apply the chat template: {exc}", "invalid_messages", "messages") from None
        choices = self._choices(body, [ids], body.requested_max_tokens, "messages", True, grammar, bool(offered))
        return Job(request_id, ChatFormat(self.token_pieces), body, choices, time.monotonic())

    # --- admission ----------------------------------------------------------------------------------------------------

    async def admit(self, job: Job) -> list[RequestStream]:
        """Submit every choice; on any refusal abort the ones already in and raise the matching HTTP error."""
        streams: list[RequestStream] = []
        try:
            for choice in job.choices:
                choice.engine_id = f"{job.request_id}-{choice.index}"
                streams.append(
                    await self.engine.add_request(
                        choice.engine_id, choice.prompt_ids, choice.params, choice.constraint, choice.canvas
                    )
                )
        except (InvalidRequestError, QueueFullError, EngineDeadError) as exc:
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise _admission_error(exc) from None
        self.metrics.prompt_tokens.inc(job.usage()["prompt_tokens"])
        return streams

    # --- events -> responses ------------------------------------------------------------------------------------------

    async def _events(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, EngineEvent]]:
        """All choices' events as they come; cancelling the consumer cancels (and so aborts) every choice."""
        merged = _EventBuffer(self.metrics)

        async def pump(i: int, stream: RequestStream) -> None:
            async for event in stream:
                merged.put(i, event)
            merged.put(i, None)

        tasks = {i: asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)}
        try:
            while tasks:
                i, event = await merged.get()
                if event is None:
                    tasks.pop(i, None)
                    continue
                stop = yield i, event
                if stop:  # a stop string ended this choice: stop listening, which aborts its engine job
                    tasks.pop(i).cancel()
        finally:
            for task in tasks.values():
                task.cancel()
            merged.clear()

    def _apply(self, job: Job, choice: Choice, event: EngineEvent) -> tuple[str, str]:
        """Fold an event into a choice; returns the (content, reasoning) text it adds."""
        if isinstance(event, BlockCommitted):
            if not job.first_token_seen:
                job.first_token_seen = True
                self.metrics.time_to_first_token.observe(event.time - job.arrival)
            if not event.partial:
                if not job.first_block_seen:
                    job.first_block_seen = True
                    self.metrics.time_to_first_block.observe(event.time - job.arrival)
                self.metrics.steps_per_canvas.observe(event.num_denoise_steps)
            choice.completion_tokens += len(event.token_ids)
            if event.logprobs is not None:
                choice.logprobs.extend(event.logprobs)
                choice.unsent.extend(event.logprobs)
            delta = choice.text.push(event.token_ids)
            if delta.stopped:
                choice.finish_reason = "stop"
        elif isinstance(event, Finished):
            delta = choice.text.flush()
            reason = event.finish_reason.value
            # A reply that called tools and ended there (the model writes <|tool_response> next) asks for results.
            called = bool(choice.tool_calls or delta.tool_calls) and reason == "stop"
            choice.finish_reason = choice.finish_reason or ("tool_calls" if called else reason)
            choice.completion_tokens = event.usage.completion_tokens
            self.metrics.tokens_per_forward.observe(event.usage.tokens_per_forward)
        else:
            return "", ""
        self.metrics.generation_tokens.inc(len(event.token_ids) if isinstance(event, BlockCommitted) else 0)
        choice.content.append(delta.content)
        choice.reasoning.append(delta.reasoning)
        choice.tool_calls.extend(delta.tool_calls)
        return delta.content, delta.reasoning

    async def collect(self, job: Job, streams: list[RequestStream], request: Request) -> JSONResponse:
        async def run() -> None:
            events = self._events(streams)
            stop = None
            while True:
                try:
                    i, event = await events.asend(stop)
                except StopAsyncIteration:
                    return
                if isinstance(event, Failed):
                    raise OpenAIError(500, f"generation failed: {event.error}", "generation_failed")
                self._apply(job, job.choices[i], event)
                stop = job.choices[i].finish_reason == "stop" and isinstance(event, BlockCommitted)

        if not await _until_disconnected(run(), request):
            return JSONResponse(error_body(499, "client closed the request", "client_closed"), status_code=499)
        self.metrics.e2e_latency.observe(time.monotonic() - job.arrival)
        return JSONResponse(self._final_body(job))

    def _final_body(self, job: Job) -> dict[str, Any]:
        choices = [job.format.choice(c) for c in sorted(job.choices, key=lambda c: c.index)]
        return {"id": job.request_id, "object": job.format.object, "created": job.created, "model": self.model_name,
                "choices": choices, "usage": job.usage()}  # fmt: skip

    def stream(self, job: Job, streams: list[RequestStream]) -> EventSourceResponse:
        return EventSourceResponse(self._sse(job, streams), ping=15, sep="\n")

    def _chunk(self, job: Job, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": job.request_id,
            "object": job.format.chunk_object,
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False)

    async def _sse(self, job: Job, streams: list[RequestStream]) -> AsyncIterator[dict[str, str]]:
        options = job.body.stream_options
        continuous = bool(options and options.continuous_usage_stats)
        diffusion = job.body.diffusion
        token_drafts: dict[int, TokenDrafts] | None = {} if diffusion and diffusion.stream_drafts == "tokens" else None
        events = self._events(streams)
        stop = None
        try:
            while True:
                try:
                    i, event = await events.asend(stop)
                except StopAsyncIteration:
                    break
                choice = job.choices[i]
                stop = None
                if isinstance(event, Failed):
                    error = error_body(500, f"generation failed: {event.error}", "generation_failed")
                    yield {"data": json.dumps(error)}
                    yield {"data": "[DONE]"}
                    return
                if isinstance(event, Draft):
                    draft = {"id": job.request_id, "index": choice.index, "step": event.step,
                             "text": self.tokenizer.decode(event.token_ids),
                             "pinned": [list(span) for span in event.pinned]}  # fmt: skip
                    if token_drafts is not None:
                        if i not in token_drafts:
                            token_drafts[i] = TokenDrafts(self.tokenizer, self._pieces)
                        draft |= token_drafts[i].payload(event.token_ids, event.step, event.pinned)
                    yield {"event": "draft", "data": json.dumps(draft, ensure_ascii=False)}
                    continue
                was_done = choice.finish_reason is not None
                calls_before = len(choice.tool_calls)
                content, reasoning = self._apply(job, choice, event)
                if was_done:
                    continue
                calls = len(choice.tool_calls) - calls_before
                finish = choice.finish_reason if (isinstance(event, Finished) or choice.finish_reason) else None
                usage = job.usage() if continuous else None
                if (
                    content
                    or reasoning
                    or calls
                    or choice.unsent
                    or (job.format.opens_with_role and not choice.started)
                ):
                    chunk = job.format.chunk_choice(choice, content, reasoning, None, calls)
                    yield {"data": self._chunk(job, [chunk], usage)}
                if finish is not None:
                    yield {"data": self._chunk(job, [job.format.chunk_choice(choice, "", "", finish, 0)], usage)}
                    stop = isinstance(event, BlockCommitted)
            if options and options.include_usage:
                yield {"data": self._chunk(job, [], job.usage())}
            yield {"data": "[DONE]"}
            self.metrics.e2e_latency.observe(time.monotonic() - job.arrival)
        finally:
            await events.aclose()


def _admission_error(exc: InvalidRequestError | QueueFullError | EngineDeadError) -> OpenAIError:
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, "the server is busy; retry shortly", "server_busy", retry_after=1)
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, "the engine is not running", "engine_unavailable", retry_after=5)
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_request"
    param = None if exc.field is None else f"diffusion.{exc.field}"  # the engine's CanvasInit fields
    return OpenAIError(400, str(exc), code, param)


class _EventBuffer:
    """A request's events, merged over its choices, until its response takes them. The pumps empty the engine's
    queues as events come, so what a slow client leaves unread waits here, bounded: a newer draft replaces its
    choice's draft still waiting (each is the whole canvas). Committed events are never dropped; they are bounded
    by max_tokens and by the send timeout that cuts off a client that stops reading (server/connections.py)."""

    def __init__(self, metrics: Metrics) -> None:
        self._items: deque[tuple[int, EngineEvent | None]] = deque()
        self._drafts: dict[int, tuple[int, EngineEvent | None]] = {}  # each choice's draft still in _items
        self._ready = asyncio.Event()
        self._metrics = metrics

    def put(self, i: int, event: EngineEvent | None) -> None:
        item = (i, event)
        if isinstance(event, Draft):
            if (stale := self._drafts.get(i)) is not None:
                self._items.remove(stale)  # the choice's only draft queued: no other item equals it
                self._metrics.drafts_dropped.inc()
                self._metrics.stream_queued_events.dec()
            self._drafts[i] = item
        self._items.append(item)
        self._metrics.stream_queued_events.inc()
        self._ready.set()

    async def get(self) -> tuple[int, EngineEvent | None]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._metrics.stream_queued_events.dec()
        if self._drafts.get(item[0]) is item:
            del self._drafts[item[0]]
        return item

    def clear(self) -> None:
        self._metrics.stream_queued_events.dec(len(self._items))
        self._items.clear()
        self._drafts.clear()


async def _until_disconnected(work: Any, request: Request) -> bool:
    """Run `work` to completion (True), unless the client disconnects first: then cancel it, aborting its jobs."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()  # re-raises an OpenAIError for the handler
                return True
            if await request.is_disconnected():
                return False
    finally:
        task.cancel()
