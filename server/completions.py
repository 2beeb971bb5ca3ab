"""/v1/completions: a CompletionRequest -> the core's job, and its updates -> `text_completion` bodies and chunks.
The chunk envelope and stream options are OpenAI's for chat too (server/chat.py builds on this)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from server.errors import OpenAIError, error_body
from server.logprobs import TokenPieces, completion_logprobs, entries_of
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidParameter,
    SamplingFields,
    UnsupportedParameter,
)
from server.serving import ApiFields, Choice, Job, Sampling, Serving, Sse, Update
from server.structured import GrammarError

logger = logging.getLogger(__name__)


def check_common(serving: Serving, body: SamplingFields) -> None:
    """The model, the parameters we cannot honour (400 naming them), and a log line for fields we ignore."""
    serving.check_model(body.model)
    try:
        body.refuse_unsupported()
    except UnsupportedParameter as exc:
        raise OpenAIError(400, str(exc), "unsupported_parameter", exc.param) from None
    if ignored := body.ignored_fields():
        logger.warning("ignoring request fields outside the OpenAI schema: %s", ", ".join(ignored))


def sampling(body: CompletionRequest | ChatCompletionRequest) -> Sampling:
    return Sampling(body.temperature, body.seed, tuple(body.stop_strings), body.ignore_eos, body.diffusion,
                    body.num_logprobs)  # fmt: skip


class CompletionsApi:
    """Choices as `text` with the legacy logprobs object; streamed, one chunk per update with text or logprobs, then
    one with the finish reason."""

    object, chunk_object = "text_completion", "text_completion"
    fields = ApiFields("prompt", "max_tokens", "logprobs")

    def __init__(self, body: SamplingFields, model_name: str, pieces: TokenPieces) -> None:
        self.options, self.model_name, self.pieces = body.stream_options, model_name, pieces
        self._offsets: dict[int, int] = {}  # per choice: characters its streamed tokens spell (text_offset)

    def choice(self, c: Choice) -> dict[str, Any]:
        logprobs = completion_logprobs(self.pieces, c.logprobs, 0) if c.request.params.logprobs is not None else None
        return {"index": c.index, "text": "".join(c.content), "logprobs": logprobs, "finish_reason": c.finish_reason}

    def chunk_choice(self, c: Choice, update: Update | None) -> dict[str, Any] | None:
        """The chunk for an update's text and logprobs (None: nothing to send), or for the finish reason when update
        is None."""
        if update is None:
            return {"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason}
        entries = entries_of(update.event)
        if not (update.content or entries):
            return None
        logprobs = None
        if c.request.params.logprobs is not None:
            offset = self._offsets.get(c.index, 0)
            logprobs = completion_logprobs(self.pieces, entries, offset)
            self._offsets[c.index] = offset + sum(map(len, logprobs["tokens"]))
        return {"index": c.index, "text": update.content, "logprobs": logprobs, "finish_reason": None}

    def body(self, job: Job) -> dict[str, Any]:
        choices = [self.choice(c) for c in sorted(job.choices, key=lambda c: c.index)]
        return {"id": job.request_id, "object": self.object, "created": job.created, "model": self.model_name,
                "choices": choices, "usage": job.usage()}  # fmt: skip

    def opening(self, job: Job) -> Iterable[Sse]:
        return ()

    def update(self, job: Job, choice: Choice, update: Update) -> Iterable[Sse]:
        usage = job.usage() if self.options and self.options.continuous_usage_stats else None
        if (chunk := self.chunk_choice(choice, update)) is not None:
            yield {"data": self._chunk(job, [chunk], usage)}
        if update.finish is not None:
            yield {"data": self._chunk(job, [self.chunk_choice(choice, None)], usage)}

    def closing(self, job: Job) -> Iterable[Sse]:
        if self.options and self.options.include_usage:
            yield {"data": self._chunk(job, [], job.usage())}
        yield {"data": "[DONE]"}

    def failed(self, job: Job, message: str) -> Iterable[Sse]:
        yield {"data": json.dumps(error_body(500, message, "generation_failed"))}
        yield {"data": "[DONE]"}

    def _chunk(self, job: Job, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> str:
        body: dict[str, Any] = {"id": job.request_id, "object": self.chunk_object, "created": job.created,
                                "model": self.model_name, "choices": choices}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False)


def completion_job(serving: Serving, body: CompletionRequest, request_id: str) -> Job:
    """Runs in a worker thread: a response_format grammar compiles here, never on the event loop."""
    check_common(serving, body)
    prompts = []
    limit = 2 * serving.max_model_len * serving.tokenizer.max_token_chars
    for prompt in body.prompts:
        # No token spans more than max_token_chars characters (x2 for normalisation): longer text cannot fit.
        if isinstance(prompt, str) and len(prompt) > limit:
            raise OpenAIError(400, f"This model's maximum context length is {serving.max_model_len} tokens; the "
                              "prompt is longer", "context_length_exceeded", "prompt")  # fmt: skip
        prompts.append(serving.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
    try:
        grammar = serving.grammars.response_format(body.response_format) if body.response_format else None
    except (GrammarError, InvalidParameter) as exc:
        raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None
    canvas, max_tokens = None, body.max_tokens
    if body.suffix:
        canvas, max_tokens = serving.infill(body.suffix, max_tokens)
    api = CompletionsApi(body, serving.model_name, serving.token_pieces)
    return serving.job(request_id, api, sampling(body), prompts, max_tokens, stream=body.stream, n=body.n,
                       split=False, grammar=grammar, canvas=canvas, cache_salt=body.cache_salt)  # fmt: skip
