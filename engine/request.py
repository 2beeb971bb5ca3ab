"""Requests, their per-request sampling parameters, the events the engine emits, what it tells its callers about
itself, and the errors it raises. No torch here."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field, replace

from models.config import GenerationDefaults

# Each field of SamplingParams that None leaves to the checkpoint, and the GenerationDefaults field it takes.
_DEFAULTS = {
    "max_tokens": "max_new_tokens",
    "stop_token_ids": "eos_token_ids",
    "max_denoising_steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_max": "t_max",
    "t_min": "t_min",
    "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
}


MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI's top_logprobs


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request settings; None means the checkpoint's generation_config value (spec 6.1)."""

    max_tokens: int | None = None  # output is cut to exactly this many tokens (finish reason "length")
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's eos ids; () never stops early
    max_denoising_steps: int | None = None  # N, steps per canvas at most
    entropy_bound: float | None = None  # gamma of the entropy-bound acceptance rule
    t_max: float | None = None  # temperature schedule: t_max on the first step ...
    t_min: float | None = None  # ... falling towards t_min on the last
    stability_threshold: int | None = None  # S: equal argmax canvases needed to stop a canvas early (0: no check)
    confidence_threshold: float | None = None  # tau: mean entropy (nats) below which a canvas may stop early
    temperature: float = 1.0  # factor on the proposal temperature: 1 = the model's schedule, 0 = argmax proposals
    seed: int | None = None  # fixes every random draw of this request, whatever else runs beside it
    stream_drafts: bool = False  # emit the argmax canvas after every denoising step
    # Early streaming: a leading canvas position whose argmax has stayed the same with entropy below settle_entropy
    # for settle_steps steps in a row is pinned (fixed for the rest of the canvas) and its prefix streamed at once.
    stream_prefix: bool = False
    settle_steps: int = 3
    settle_entropy: float = 0.05
    logprobs: int | None = None  # None: none; k: each committed token's logprob and its k most likely alternatives

    def resolve(self, defaults: GenerationDefaults, max_model_len: int, prompt_len: int) -> SamplingParams:
        """Fill unset fields from the checkpoint's defaults and check every value; raises InvalidRequestError
        (ContextLengthError when prompt + max_tokens exceed max_model_len)."""
        unset = {name: getattr(defaults, default) for name, default in _DEFAULTS.items() if getattr(self, name) is None}
        p = replace(self, **unset)
        p = replace(p, stop_token_ids=tuple(p.stop_token_ids))
        if p.max_tokens >= 1 and prompt_len + p.max_tokens > max_model_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({p.max_tokens}) exceeds max_model_len {max_model_len}"
            )
        checks = [
            (p.max_tokens >= 1, f"max_tokens must be >= 1, got {p.max_tokens}"),
            (p.max_denoising_steps >= 1, f"max_denoising_steps must be >= 1, got {p.max_denoising_steps}"),
            (p.entropy_bound > 0, f"entropy_bound must be > 0, got {p.entropy_bound}"),
            (0 < p.t_min <= p.t_max, f"need 0 < t_min <= t_max, got t_min={p.t_min}, t_max={p.t_max}"),
            (p.stability_threshold >= 0, f"stability_threshold must be >= 0, got {p.stability_threshold}"),
            (p.confidence_threshold > 0, f"confidence_threshold must be > 0, got {p.confidence_threshold}"),
            (0 <= p.temperature <= 100, f"temperature must be in [0, 100], got {p.temperature}"),
            (p.seed is None or 0 <= p.seed < 2**63, f"seed must be in [0, 2**63), got {p.seed}"),
            (p.settle_steps >= 1, f"settle_steps must be >= 1, got {p.settle_steps}"),
            (p.settle_entropy > 0, f"settle_entropy must be > 0, got {p.settle_entropy}"),
            (
                p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
        return p


@dataclass(frozen=True, slots=True)
class CanvasInit:
    """How a request's first canvas starts instead of from noise: `ids[i]` is the input id of canvas position i
    (None: noise, as are the positions past the end), and the [start, end) spans of `pinned` keep their ids for the
    whole canvas: never renoised, never re-proposed, committed as given.

    A warm start (edit in place) gives the leading ids; an infill gives None for the middle and pins the suffix
    after it."""

    ids: tuple[int | None, ...] = ()
    pinned: tuple[tuple[int, int], ...] = ()

    def check(self, canvas_length: int, vocab_size: int) -> None:
        """Raises InvalidRequestError (field "canvas" or "pinned") unless this fits a canvas of that length over
        that vocabulary."""
        if len(self.ids) > canvas_length:
            raise InvalidRequestError(f"the canvas is {len(self.ids)} tokens; a canvas holds {canvas_length}", "canvas")
        if bad := [t for t in self.ids if t is not None and not 0 <= t < vocab_size]:
            raise InvalidRequestError(f"canvas token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "canvas")
        end = 0
        for start, stop in sorted(self.pinned):
            span = f"pinned span [{start}, {stop})"
            if not 0 <= start < stop <= len(self.ids):
                raise InvalidRequestError(f"{span} is not inside the given canvas of {len(self.ids)} tokens", "pinned")
            if start < end:
                raise InvalidRequestError(f"{span} overlaps another pinned span", "pinned")
            if any(self.ids[i] is None for i in range(start, stop)):
                raise InvalidRequestError(f"{span} covers positions without a token", "pinned")
            end = stop


class InvalidRequestError(ValueError):
    """The request itself is wrong (HTTP 400); `field` names the add_request argument at fault ("canvas" or
    "pinned" for a CanvasInit's), where one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(InvalidRequestError):
    """The request can never fit: prompt + max_tokens beyond max_model_len or the whole KV budget (HTTP 400,
    context_length_exceeded)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; nothing more will be served (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What callers of the engine may know about it: fixed when the engine is built."""

    max_model_len: int  # prompt + max_tokens at most
    vocab_size: int
    canvas_length: int
    max_num_seqs: int
    stop_token_ids: tuple[int, ...]  # the checkpoint's eos ids: what ends a reply by default
    kv_budget_bytes: int  # KV memory for all sequences' pages
    kv_page_tokens: int
    kv_page_bytes: int
    generation_defaults: GenerationDefaults  # the checkpoint's sampler settings: what a request's None stands for
    eager_buckets: tuple[str, ...] = ()  # "ROWSxPAGES" step buckets whose compile or capture failed (or "all")

    def kv_bytes_for(self, prompt_len: int, max_tokens: int) -> int:
        """KV bytes a request of this shape is charged: the pages of its prompt and of whole canvases."""
        capacity = kv_capacity(prompt_len, max_tokens, self.canvas_length)
        return math.ceil(capacity / self.kv_page_tokens) * self.kv_page_bytes


def kv_capacity(prompt_len: int, max_tokens: int, canvas_length: int) -> int:
    """Slots a sequence can ever hold: prompt, every committed canvas, and the one being denoised."""
    return prompt_len + math.ceil(max_tokens / canvas_length) * canvas_length


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client went away


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    num_canvases: int
    num_denoise_steps: int  # decoder forwards this request took part in

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / max(self.num_denoise_steps, 1)


@dataclass(frozen=True, slots=True)
class Logprob:
    """A committed token's log-probability under the raw model distribution (log_softmax of the softcapped logits,
    temperature 1) that its canvas position had at the step that committed it, and the `top` most likely ids there
    with theirs, best first (README "Logprobs")."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class BlockCommitted:
    """Output tokens ready to stream: a finished canvas (cut at a stop token or max_tokens), or with `partial` the
    newly settled prefix of a canvas still denoising (stream_prefix). Nothing sent is ever taken back: a canvas's
    final block carries only what its partial blocks did not.

    `stop_token_id` is the stop token that ends the reply right after these tokens: not output, but counted in
    usage. With SamplingParams.logprobs, `logprobs` has one entry per token and then one for that stop token (a
    block may then hold no tokens and only the stop token's entry)."""

    request_id: str
    token_ids: list[int]
    num_denoise_steps: int
    partial: bool = False
    stop_token_id: int | None = None
    logprobs: tuple[Logprob, ...] | None = None
    time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Draft:
    """The argmax canvas after a denoising step (only for requests with stream_drafts)."""

    request_id: str
    token_ids: list[int]
    step: int
    pinned: tuple[tuple[int, int], ...] = ()  # [start, end) spans of positions fixed for the rest of the canvas
    time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Failed:
    """The request could not be served (refused at admission, or the engine faulted); `error` is user-safe text."""

    request_id: str
    error: str
    time: float = field(default_factory=time.monotonic)


EngineEvent = BlockCommitted | Draft | Finished | Failed


@dataclass(frozen=True, slots=True)
class StepStats:
    """One engine iteration, for metrics and benchmarks."""

    num_running: int
    num_waiting: int
    num_encode_tokens: int
    num_denoise_rows: int
    num_output_tokens: int  # tokens committed to outputs this iteration
    encode_s: float
    denoise_s: float  # the denoising step: decoder forward, sampler and its results copy
    kv_bytes_used: int
