"""A request's life inside the engine: its prefix, where its KV memory is, and its counters. No tensors here:
the canvas lives in the engine's slot-indexed canvas state."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from engine.constraint import Constraint
from engine.request import CanvasInit, SamplingParams, kv_capacity


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # resolved: no None fields
    canvas_length: int
    constraint: Constraint | None = None  # a grammar the output must follow (engine/constraint.py)
    canvas_init: CanvasInit | None = None  # how the first canvas starts (warm start, infill); None: noise
    status: Status = Status.WAITING
    seed: int = 0  # keys this sequence's noise (fast mode); reference mode draws from the global generator
    # KV memory: a slot (its sliding-window ring and its row of the canvas state) and full-layer pages.
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    length: int = 0  # tokens in the cache
    to_encode: list[int] = field(default_factory=list)  # the prompt, then each finished canvas to commit
    canvas_steps: int = 0
    pinned_prefix: int = 0  # leading positions of the current canvas that are pinned (given or settled)
    streamed: int = 0  # tokens of the current canvas already emitted (settled prefix, stream_prefix)
    # Totals for usage.
    num_output_tokens: int = 0
    num_canvases: int = 0
    num_denoise_steps: int = 0

    @property
    def max_canvases(self) -> int:
        return math.ceil(self.params.max_tokens / self.canvas_length)

    @property
    def kv_capacity(self) -> int:
        return kv_capacity(len(self.prompt_ids), self.params.max_tokens, self.canvas_length)

    @property
    def settles(self) -> bool:
        """Whether this canvas pins and streams its settled prefix early (a grammar walks only whole canvases)."""
        return self.params.stream_prefix and self.constraint is None

    @property
    def tokens_left(self) -> int:
        """Output tokens this sequence may still commit (max_tokens less what its finished canvases gave)."""
        return self.params.max_tokens - self.num_output_tokens

    def pinned_spans(self) -> tuple[tuple[int, int], ...]:
        """[start, end) spans of the current canvas's pinned positions. The pinned prefix runs through every given
        span that starts inside it, so the given spans left are those after it."""
        given = self.canvas_init.pinned if self.canvas_init is not None and self.num_canvases == 0 else ()
        head = [(0, self.pinned_prefix)] if self.pinned_prefix else []
        return tuple(head + sorted(span for span in given if span[0] > self.pinned_prefix))

    @property
    def steps_left(self) -> int:
        """n in the temperature schedule: steps remaining including the one about to run (spec 6.2)."""
        return self.params.max_denoising_steps - self.canvas_steps
