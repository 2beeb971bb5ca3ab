"""The request core every API shares: one internal job per request, admission, the merged event path, disconnects,
metrics and SSE plumbing. The APIs are translators (server/chat.py, completions.py, responses.py, messages.py): each
parses its request into a `Job` through `Serving.job`, and turns the job's `Update`s into its bodies and events.

parse -> one engine Request per choice -> admit every choice (the engine validates; its errors become real status
codes naming the API's parameter, before any 200) -> stream the translator's events per committed block, or collect.
A client that goes away aborts its jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from engine.async_engine import AsyncEngine, RequestStream
from engine.request import (
    DIFFUSION_OPTIONS,
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
from engine.request import Request as EngineRequest
from server.drafts import TokenDrafts
from server.errors import OpenAIError
from server.logprobs import TokenPieces
from server.metrics import Metrics
from server.protocol import DiffusionOptions
from server.structured import Grammars
from server.text import OutputText, Tokenizer
from server.tools import ToolCall

logger = logging.getLogger(__name__)

Sse = dict[str, str]  # one server-sent event: {"event": name?, "data": text}


@dataclass(frozen=True, slots=True)
class Sampling:
    """What every API's sampling fields come down to."""

    temperature: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    diffusion: DiffusionOptions | None = None
    logprobs: int | None = None  # alternatives per token; None: no logprobs


@dataclass(frozen=True, slots=True)
class ApiFields:
    """One API's names for the request fields that the engine's errors name (InvalidRequestError.field): the one
    place engine field names become HTTP parameters."""

    prompt: str  # messages, prompt or input
    max_tokens: str  # max_tokens, max_completion_tokens or max_output_tokens
    logprobs: str | None = None  # logprobs or top_logprobs; None where the API has none

    def param(self, field: str | None) -> str | None:
        if field in DIFFUSION_OPTIONS:
            return f"diffusion.{field}"
        names = {"prompt": self.prompt, "max_tokens": self.max_tokens, "logprobs": self.logprobs,
                 "canvas_init": "diffusion.canvas", "pinned": "diffusion.pinned", "temperature": "temperature",
                 "seed": "seed"}  # fmt: skip
        return names.get(field or "")


@dataclass(slots=True)
class Choice:
    """One (prompt, sample) pair: its engine request and the text it has produced."""

    index: int
    request: EngineRequest
    text: OutputText
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prefix cache (known once the choice has finished)
    finish_reason: str | None = None  # stop, length, tool_calls (or an engine reason)
    logprobs: list[Logprob] = field(default_factory=list)  # every entry so far, when params.logprobs is set


@dataclass(frozen=True, slots=True)
class Update:
    """What one engine event added to a choice, for its API to format. `event` carries the committed tokens (and any
    per-token data the engine attaches to them): the translators are the one place that formats them."""

    event: BlockCommitted | Finished
    content: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]  # calls completed by this event
    finish: str | None  # set on the update that ends the choice


class Translator(Protocol):
    """One API's side of a job: its names for the engine's fields, its response body, and its stream events around
    the core's updates."""

    fields: ApiFields

    def body(self, job: Job) -> dict[str, Any]: ...
    def opening(self, job: Job) -> Iterable[Sse]: ...
    def update(self, job: Job, choice: Choice, update: Update) -> Iterable[Sse]: ...
    def closing(self, job: Job) -> Iterable[Sse]: ...
    def failed(self, job: Job, message: str) -> Iterable[Sse]: ...


@dataclass(slots=True)
class Job:
    """Everything one HTTP request runs."""

    request_id: str
    api: Translator
    choices: list[Choice]
    stream: bool
    n: int = 1  # samples per prompt
    token_drafts: bool = False  # diffusion.stream_drafts == "tokens"
    arrival: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_seen: bool = False
    first_block_seen: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.request.prompt_ids) for c in self.choices if c.index % self.n == 0)  # each prompt once

    @property
    def cached_tokens(self) -> int:
        """Of prompt_tokens, those read from the prefix cache: each prompt's first sample, admitted first, so what the
        cache held of the prompt before this request (later samples may hit the pages the first one wrote)."""
        return sum(c.cached_tokens for c in self.choices if c.index % self.n == 0)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict[str, Any]:
        """OpenAI's chat and completions usage."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # fmt: skip


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
        self.token_pieces = TokenPieces(tokenizer)  # token id -> its text and bytes, for the translators' logprobs

    # --- request -> job ---------------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "model_not_found", "model")

    def job(
        self,
        request_id: str,
        api: Translator,
        sampling: Sampling,
        prompts: list[list[int]],
        max_tokens: int | None,
        *,
        stream: bool,
        n: int = 1,
        split: bool = True,
        grammar: str | None = None,
        tool_calls: bool = False,
        canvas: CanvasInit | None = None,
        cache_salt: str | None = None,
    ) -> Job:
        """The one internal job: `n` choices per prompt, each one engine Request (sampling params, grammar walk,
        canvas and prefix-cache salt), checked by the engine at admission. `split`: the output has Gemma's thought
        channel and tool calls."""
        canvas = canvas or self.warm_start(sampling.diffusion)
        choices = []
        for p, ids in enumerate(prompts):
            budget = max_tokens or max(1, min(self.default_max_tokens, self.max_model_len - len(ids)))
            for sample in range(n):
                index = p * n + sample
                params = self._sampling_params(sampling, budget, sample)
                constraint = None if grammar is None else self.grammars.constraint(grammar, budget)
                request = EngineRequest(
                    f"{request_id}-{index}", tuple(ids), params, constraint, canvas, cache_salt=cache_salt
                )
                text = OutputText(self.tokenizer, sampling.stop, split_reasoning=split, tool_calls=tool_calls)
                choices.append(Choice(index, request, text))
        token_drafts = bool(sampling.diffusion and sampling.diffusion.stream_drafts == "tokens")
        return Job(request_id, api, choices, stream, n, token_drafts)

    def warm_start(self, d: DiffusionOptions | None) -> CanvasInit | None:
        """diffusion.canvas and diffusion.pinned as the first canvas's start (the engine checks them)."""
        if d is None or d.canvas is None:
            return None
        ids = self.tokenizer.encode(d.canvas) if isinstance(d.canvas, str) else d.canvas
        return CanvasInit(tuple(ids), tuple(d.pinned or ()))

    def infill(self, suffix: str, max_tokens: int | None) -> tuple[CanvasInit, int]:
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

    def chat_prompt_ids(
        self, messages: list[dict[str, Any]], enable_thinking: bool, tools: list[dict[str, Any]] | None,
        param: str = "messages",
    ) -> list[int]:  # fmt: skip
        """The chat template's prompt ids; what it cannot render is a 400 naming `param`."""
        try:
            return self.tokenizer.chat_prompt_ids(messages, enable_thinking, tools)
        except ValueError as exc:
            raise OpenAIError(400, f"cannot apply the chat template: {exc}", "invalid_messages", param) from None

    def _sampling_params(self, s: Sampling, max_tokens: int, sample: int) -> SamplingParams:
        """The diffusion options pass by name, unset ones (None) left to SamplingParams' defaults."""
        d = s.diffusion
        options = {name: value for name in DIFFUSION_OPTIONS if d and (value := getattr(d, name)) is not None}
        options["stream_drafts"] = bool(options.get("stream_drafts"))  # "tokens" too: the server adds the token text
        options.setdefault("stream_prefix", self.stream_prefix)
        return SamplingParams(
            max_tokens=max_tokens,
            stop_token_ids=() if s.ignore_eos else None,
            temperature=1.0 if s.temperature is None else s.temperature,
            seed=None if s.seed is None else (s.seed + sample) % 2**63,  # n samples must differ
            logprobs=s.logprobs,
            **options,
        )

    def render(self, job: Job) -> list[dict[str, Any]]:
        """Each prompt of a job as vLLM's render endpoints give it (a GenerateRequest: the prompt's token ids and the
        resolved sampling parameters), without generating. The engine's admission checks run, so bad input is the
        same 400 as from the generation endpoint."""
        rendered = []
        for choice in job.choices[:: job.n]:
            try:
                params = choice.request.validate(self.engine.info)
            except InvalidRequestError as exc:
                raise _admission_error(exc, job.api.fields) from None
            diffusion = {name: getattr(params, name) for name in DIFFUSION_OPTIONS}
            sampling = {"n": job.n, "max_tokens": params.max_tokens, "temperature": params.temperature,
                        "seed": params.seed, "stop_token_ids": list(params.stop_token_ids), "logprobs": params.logprobs,
                        "extra_args": {"diffusion": diffusion}}  # fmt: skip
            rendered.append({"request_id": choice.request.request_id, "token_ids": list(choice.request.prompt_ids),
                             "features": None, "sampling_params": sampling, "model": self.model_name,
                             "stream": job.stream, "stream_options": None,
                             "cache_salt": choice.request.cache_salt, "priority": 0,
                             "kv_transfer_params": None})  # fmt: skip
        return rendered

    # --- admission ----------------------------------------------------------------------------------------------------

    async def respond(self, job: Job, request: Request) -> Response:
        """Admit the job (before any 200: overload is a real status code), then stream or collect it."""
        streams = await self.admit(job)
        if job.stream:
            return EventSourceResponse(self._sse(job, streams), ping=15, sep="\n")
        return await self.collect(job, streams, request)

    async def admit(self, job: Job) -> list[RequestStream]:
        """Submit every choice, all or (on any refusal, with the matching HTTP error) none."""
        try:
            streams = await self.engine.add_requests([choice.request for choice in job.choices])
        except (InvalidRequestError, QueueFullError, EngineDeadError) as exc:
            raise _admission_error(exc, job.api.fields) from None
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        return streams

    # --- events -> updates --------------------------------------------------------------------------------------------

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

    def _apply(self, job: Job, choice: Choice, event: BlockCommitted | Finished) -> Update | None:
        """Fold an event into a choice; the update it makes, or None once the choice has finished."""
        was_done = choice.finish_reason is not None
        if isinstance(event, BlockCommitted):
            if not job.first_token_seen:
                job.first_token_seen = True
                self.metrics.time_to_first_token.observe(event.time - job.arrival)
            if not event.partial:
                if not job.first_block_seen:
                    job.first_block_seen = True
                    self.metrics.time_to_first_block.observe(event.time - job.arrival)
                self.metrics.steps_per_canvas.observe(event.num_denoise_steps)
            self.metrics.generation_tokens.inc(len(event.token_ids))
            choice.completion_tokens += len(event.token_ids)
            choice.logprobs.extend(event.logprobs or ())
            delta = choice.text.push(event.token_ids)
            if delta.stopped:
                choice.finish_reason = "stop"
        else:
            delta = choice.text.flush()
            reason = event.finish_reason.value
            # A reply that called tools and ended there (the model writes <|tool_response> next) asks for results.
            called = bool(choice.tool_calls or delta.tool_calls) and reason == "stop"
            choice.finish_reason = choice.finish_reason or ("tool_calls" if called else reason)
            choice.completion_tokens = event.usage.completion_tokens
            choice.cached_tokens = event.usage.cached_tokens
            self.metrics.tokens_per_forward.observe(event.usage.tokens_per_forward)
        choice.content.append(delta.content)
        choice.reasoning.append(delta.reasoning)
        choice.tool_calls.extend(delta.tool_calls)
        if was_done:
            return None
        finish = choice.finish_reason if (isinstance(event, Finished) or choice.finish_reason) else None
        if finish is not None:
            self.metrics.on_finish(finish)
        return Update(event, delta.content, delta.reasoning, delta.tool_calls, finish)

    async def collect(self, job: Job, streams: list[RequestStream], request: Request) -> Response:
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
                stop = None
                if isinstance(event, (BlockCommitted, Finished)):
                    update = self._apply(job, job.choices[i], event)
                    stop = update is not None and update.finish is not None and isinstance(event, BlockCommitted)

        if not await _until_disconnected(run(), request):
            raise OpenAIError(499, "client closed the request", "client_closed")
        self.metrics.e2e_latency.observe(time.monotonic() - job.arrival)
        return JSONResponse(job.api.body(job))

    async def _sse(self, job: Job, streams: list[RequestStream]) -> AsyncIterator[Sse]:
        token_drafts: dict[int, TokenDrafts] = {}
        events = self._events(streams)
        stop = None
        try:
            for sse in job.api.opening(job):
                yield sse
            while True:
                try:
                    i, event = await events.asend(stop)
                except StopAsyncIteration:
                    break
                choice = job.choices[i]
                stop = None
                if isinstance(event, Failed):
                    for sse in job.api.failed(job, f"generation failed: {event.error}"):
                        yield sse
                    return
                if isinstance(event, Draft):
                    draft = {"id": job.request_id, "index": choice.index, "step": event.step,
                             "text": self.tokenizer.decode(event.token_ids),
                             "pinned": [list(span) for span in event.pinned]}  # fmt: skip
                    if job.token_drafts:
                        if i not in token_drafts:
                            token_drafts[i] = TokenDrafts(self.tokenizer, self._pieces)
                        draft |= token_drafts[i].payload(event.token_ids, event.step, event.pinned)
                    yield {"event": "draft", "data": json.dumps(draft, ensure_ascii=False)}
                    continue
                if not isinstance(event, (BlockCommitted, Finished)):
                    continue
                update = self._apply(job, choice, event)
                if update is None:
                    continue
                for sse in job.api.update(job, choice, update):
                    yield sse
                stop = update.finish is not None and isinstance(event, BlockCommitted)
            for sse in job.api.closing(job):
                yield sse
            self.metrics.e2e_latency.observe(time.monotonic() - job.arrival)
        finally:
            await events.aclose()


def _admission_error(exc: InvalidRequestError | QueueFullError | EngineDeadError, fields: ApiFields) -> OpenAIError:
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, "the server is busy; retry shortly", "server_busy", retry_after=1)
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, "the engine is not running", "engine_unavailable", retry_after=5)
    if isinstance(exc, ContextLengthError):
        code = "context_length_exceeded"
    else:
        code = "invalid_prompt" if exc.field == "prompt" else "invalid_request"
    return OpenAIError(400, str(exc), code, fields.param(exc.field))


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
