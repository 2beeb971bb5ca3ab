"""A request's life inside the engine: where its KV memory is, its place in the canvas cycle, and its counters.
Only the scheduler writes a Sequence; the model runner reads it. No tensors here: the canvas lives in the runner's
slot-indexed canvas state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine import noise
from engine.constraint import Constraint
from engine.prefix_cache import Block
from engine.request import CanvasInit, Request, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    params: SamplingParams  # resolved: no None fields
    seed: int  # keys this sequence's noise (fast mode); reference mode draws from the global generator
    num_pages: int  # full-layer KV pages it is charged: its prompt and every canvas it may commit
    canvas_length: int
    status: Status = Status.WAITING
    # KV memory: a slot (its sliding-window ring and its row of the canvas state) and full-layer pages.
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # prefix-cache blocks of its first pages (engine/prefix_cache.py)
    num_cached: int = 0  # prompt tokens found in the prefix cache
    token_ids: list[int] = field(default_factory=list)  # by position: the prompt, then each committed canvas
    length: int = 0  # tokens in the cache (or on their way there in this iteration's encode)
    to_encode: list[int] = field(default_factory=list)  # the prompt, then each finished canvas to commit
    canvas_steps: int = 0
    pinned_prefix: int = 0  # leading positions of the current canvas that are pinned (given or settled)
    streamed: int = 0  # tokens of the current canvas already emitted (settled prefix, stream_prefix)
    # Totals for usage.
    num_output_tokens: int = 0
    num_canvases: int = 0
    num_denoise_steps: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def constraint(self) -> Constraint | None:
        return self.request.constraint

    @property
    def canvas_init(self) -> CanvasInit | None:
        """How the current canvas starts: the request's for the first one, noise (None) after."""
        return self.request.canvas_init if self.num_canvases == 0 else None

    @property
    def settles(self) -> bool:
        """Whether this canvas pins and streams its settled prefix early (a grammar walks only whole canvases)."""
        return self.params.stream_prefix and self.constraint is None

    @property
    def tokens_left(self) -> int:
        """Output tokens this sequence may still commit (max_tokens less what its finished canvases gave)."""
        return self.params.max_tokens - self.num_output_tokens

    @property
    def schedule_temperature(self) -> float:
        """T = t_min + (t_max - t_min) * n / N, n the steps remaining including the one about to run (spec 6.2)."""
        p = self.params
        return p.t_min + (p.t_max - p.t_min) * (p.steps - self.canvas_steps) / p.steps

    @property
    def noise_key(self) -> int:
        """Keys the random numbers of the step about to run (engine/noise.py)."""
        return noise.step_key(self.seed, self.num_canvases, self.canvas_steps + 1)

    def pinned_spans(self) -> tuple[tuple[int, int], ...]:
        """[start, end) spans of the current canvas's pinned positions. The pinned prefix runs through every given
        span that starts inside it, so the given spans left are those after it."""
        given = self.canvas_init.pinned if self.canvas_init is not None else ()
        head = [(0, self.pinned_prefix)] if self.pinned_prefix else []
        return tuple(head + sorted(span for span in given if span[0] > self.pinned_prefix))
