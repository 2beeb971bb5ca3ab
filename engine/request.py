"""What enters the engine and what comes out: a `Request` with its sampling parameters (checked once, here), the
per-row step inputs those parameters become, the events the engine emits, what it tells its callers about itself,
and the errors it raises. No torch here."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from models.config import GenerationDefaults

if TYPE_CHECKING:
    from engine.constraint import Constraint
    from engine.sequence import Sequence

# Each field of SamplingParams that None leaves to the checkpoint, and the GenerationDefaults field it takes.
_DEFAULTS = {
    "max_tokens": "max_new_tokens",
    "stop_token_ids": "eos_token_ids",
    "steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_max": "t_max",
    "t_min": "t_min",
    "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
}

MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI's top_logprobs
MAX_STOP_TOKEN_IDS = 16  # the width of the step's stop-id input (the commit test runs on the device)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request settings; None means the checkpoint's generation_config value (spec 6.1). The diffusion options
    keep these names over HTTP (`diffusion.<name>`) and on the command line (`--<name>`)."""

    max_tokens: int | None = None  # output is cut to exactly this many tokens (finish reason "length")
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's eos ids; () never stops early
    temperature: float = 1.0  # factor on the schedule's proposal temperature: 1 = the model's, 0 = argmax proposals
    seed: int | None = None  # fixes every random draw of this request, whatever else runs beside it
    logprobs: int | None = None  # None: none; k: each committed token's logprob and its k most likely alternatives
    # The diffusion options.
    steps: int | None = None  # N, denoising steps per canvas at most
    entropy_bound: float | None = None  # gamma of the entropy-bound acceptance rule
    t_max: float | None = None  # temperature schedule: t_max on the first step ...
    t_min: float | None = None  # ... falling towards t_min on the last
    stability_threshold: int | None = None  # S: equal argmax canvases needed to stop a canvas early (0: no check)
    confidence_threshold: float | None = None  # tau: mean entropy (nats) below which a canvas may stop early
    stream_drafts: bool = False  # emit the argmax canvas after every denoising step
    # Early streaming: a leading canvas position whose argmax has stayed the same with entropy below settle_entropy
    # for settle_steps steps in a row is pinned (fixed for the rest of the canvas) and its prefix streamed at once.
    stream_prefix: bool = False
    settle_steps: int = 3
    settle_entropy: float = 0.05

    def resolve(self, defaults: GenerationDefaults) -> SamplingParams:
        """Fill unset fields from the checkpoint's defaults and check every value; raises InvalidRequestError naming
        the field."""
        unset = {name: getattr(defaults, default) for name, default in _DEFAULTS.items() if getattr(self, name) is None}
        p = replace(self, **unset)
        p = replace(p, stop_token_ids=tuple(p.stop_token_ids))
        for name, (ok, bound) in _CHECKS.items():
            value = getattr(p, name)
            if not ok(value):
                raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
        if not p.t_min <= p.t_max:
            raise InvalidRequestError(f"need t_min <= t_max, got t_min={p.t_min}, t_max={p.t_max}", "t_min")
        return p


# The SamplingParams fields that are diffusion options: `diffusion.<name>` over HTTP, `--<name>` on the command line.
DIFFUSION_OPTIONS = (
    "steps",
    "entropy_bound",
    "t_max",
    "t_min",
    "stability_threshold",
    "confidence_threshold",
    "stream_drafts",
    "stream_prefix",
    "settle_steps",
    "settle_entropy",
)

# Each checked field: (whether a resolved value is valid, what it must be).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "stop_token_ids": (lambda v: len(v) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} ids"),
    "temperature": (lambda v: 0 <= v <= 100, "in [0, 100]"),
    "seed": (lambda v: v is None or 0 <= v < 2**63, "in [0, 2**63)"),
    "logprobs": (lambda v: v is None or 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
    "steps": (lambda v: 1 <= v <= 1024, ">= 1 and <= 1024"),
    "entropy_bound": (lambda v: 0 < v <= 1e4, "> 0 and <= 1e4"),
    "t_max": (lambda v: 0 < v <= 100, "in (0, 100]"),
    "t_min": (lambda v: 0 < v <= 100, "in (0, 100]"),
    "stability_threshold": (lambda v: 0 <= v <= 1024, ">= 0 and <= 1024"),
    "confidence_threshold": (lambda v: 0 < v <= 1e4, "> 0 and <= 1e4"),
    "settle_steps": (lambda v: 1 <= v <= 1024, ">= 1 and <= 1024"),
    "settle_entropy": (lambda v: 0 < v <= 1e4, "> 0 and <= 1e4"),
}


@dataclass(frozen=True, slots=True)
class StepInput:
    """One per-row input of the denoising step: a [rows] (or [rows, width]) tensor built on the host from the
    sequence in each row, `inert` for rows that are idle or encoding (computed, then masked out of every update)."""

    name: str
    dtype: str  # a torch dtype's name
    inert: int | float | bool
    value: Callable[[Sequence], Any]
    width: int | None = None  # a list of up to `width` values per row, padded with `inert`

    def row(self, seq: Sequence | None) -> Any:
        """This input's value for the sequence in a row (None: an idle or encoding row)."""
        if self.width is None:
            return self.inert if seq is None else self.value(seq)
        given = () if seq is None else tuple(self.value(seq))
        return [*given, *[self.inert] * (self.width - len(given))]


# The step's per-row inputs: what the canvas update and the sampler read, by these names.
STEP_INPUTS = (
    StepInput("denoising", "bool", False, lambda s: True),
    StepInput("length", "long", 0, lambda s: s.length),  # tokens in the KV cache before the canvas
    StepInput("schedule_temperature", "float32", 1.0, lambda s: s.schedule_temperature),
    StepInput("temperature", "float32", 1.0, lambda s: s.params.temperature),
    StepInput("entropy_bound", "float32", 1.0, lambda s: s.params.entropy_bound),
    StepInput("stability_threshold", "long", 0, lambda s: s.params.stability_threshold),
    StepInput("confidence_threshold", "float32", 0.0, lambda s: s.params.confidence_threshold),
    StepInput("noise_key", "long", 0, lambda s: s.noise_key),  # of (seed, canvas index, step): engine/noise.py
    StepInput("last_step", "bool", False, lambda s: s.canvas_steps + 1 == s.params.steps),  # the canvas commits
    StepInput("settle_steps", "long", 0, lambda s: s.params.settle_steps if s.settles else 0),  # 0: no settling
    StepInput("settle_entropy", "float32", 0.0, lambda s: s.params.settle_entropy),
    StepInput("tokens_left", "long", 0, lambda s: min(s.tokens_left, s.canvas_length)),  # in this canvas
    StepInput("stop_token_ids", "long", -1, lambda s: s.params.stop_token_ids, MAX_STOP_TOKEN_IDS),
)


@dataclass(frozen=True, slots=True)
class Request:
    """One generation job, as it enters the engine (Engine.add_request checks it once, with `validate`)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    constraint: Constraint | None = None  # a grammar the output must follow (engine/constraint.py)
    canvas_init: CanvasInit | None = None  # how the first canvas starts (warm start, infill); None: noise
    cache_salt: str | None = None  # prefix-cache pages are shared only between requests of the same salt

    def validate(self, info: EngineInfo) -> SamplingParams:
        """The resolved sampling parameters; raises InvalidRequestError naming the field at fault ("prompt",
        "canvas_init", "pinned" or a SamplingParams field), ContextLengthError when it can never fit."""
        if not self.prompt_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = info.vocab_size
        if bad := [t for t in self.prompt_ids if not 0 <= t < vocab]:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        if self.canvas_init is not None:
            self.canvas_init.check(info.canvas_length, vocab)
            if self.canvas_init.pinned and self.constraint is not None:  # a grammar may rewrite any position
                raise InvalidRequestError("pinned canvas positions cannot be combined with a grammar", "pinned")
        params = self.params.resolve(info.generation_defaults)
        prompt = len(self.prompt_ids)
        if prompt + params.max_tokens > info.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
                f"{params.max_tokens} output tokens and your prompt contains {prompt} tokens.",
                "prompt",
            )
        if (pages := info.kv_pages_for(prompt, params.max_tokens)) > info.kv_num_pages:
            raise ContextLengthError(
                f"the request needs {pages} KV pages of {info.kv_page_tokens} tokens, more than the whole budget of "
                f"{info.kv_num_pages}; shorten the prompt or max_tokens",
                "prompt",
            )
        return params


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
        """Raises InvalidRequestError (field "canvas_init" or "pinned") unless this fits a canvas of that length
        over that vocabulary."""
        if len(self.ids) > canvas_length:
            raise InvalidRequestError(
                f"the canvas is {len(self.ids)} tokens; a canvas holds {canvas_length}", "canvas_init"
            )
        if bad := [t for t in self.ids if t is not None and not 0 <= t < vocab_size]:
            raise InvalidRequestError(
                f"canvas token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "canvas_init"
            )
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
    """The request itself is wrong (HTTP 400); `field` names what is at fault (Request.validate), where one thing
    is."""

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
    kv_num_pages: int  # the KV pool: full-layer pages shared by all sequences
    kv_page_tokens: int
    kv_page_bytes: int
    generation_defaults: GenerationDefaults  # the checkpoint's sampler settings: what a request's None stands for
    eager_buckets: tuple[str, ...] = ()  # "ROWSxPAGES" step buckets whose compile or capture failed (or "all")
    prefix_caching: bool = False
    # The prefix cache may hold every full-layer page not in use, plus this store of the sliding layers' KV of
    # cached pages (engine/prefix_cache.py).
    prefix_cache_sliding_pages: int = 0
    prefix_cache_sliding_page_bytes: int = 0

    @property
    def kv_budget_bytes(self) -> int:
        return self.kv_num_pages * self.kv_page_bytes

    @property
    def prefix_cache_bytes(self) -> int:
        """The most KV memory the prefix cache may hold: every full-layer page while no request uses it, plus the
        store of cached pages' sliding-layer KV (0 with prefix caching off)."""
        if not self.prefix_caching:
            return 0
        return self.kv_budget_bytes + self.prefix_cache_sliding_pages * self.prefix_cache_sliding_page_bytes

    def kv_pages_for(self, prompt_len: int, max_tokens: int) -> int:
        """KV pages a request of this shape is charged: its prompt, every committed canvas, and the one being
        denoised."""
        capacity = prompt_len + math.ceil(max_tokens / self.canvas_length) * self.canvas_length
        return math.ceil(capacity / self.kv_page_tokens)


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
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not encoded

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
    kv_pages_used: int
    # Prefix cache: prompt tokens looked up and found at this iteration's admissions, pages it holds now (in use or
    # not), and pages it evicted this iteration.
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_cached_pages: int = 0
    prefix_evictions: int = 0
