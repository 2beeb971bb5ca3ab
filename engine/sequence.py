"""A request's life inside the engine: its prefix, its KV memory and the canvas it is denoising."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from engine.kv_cache import SequenceKV
from engine.request import SamplingParams


def kv_capacity(prompt_len: int, max_tokens: int, canvas_length: int) -> int:
    """Slots a sequence can ever hold: prompt, every committed canvas, and the one being denoised."""
    return prompt_len + math.ceil(max_tokens / canvas_length) * canvas_length


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
    status: Status = Status.WAITING
    generator: torch.Generator | None = None  # None in reference mode: the global generator
    kv: SequenceKV | None = None
    kv_bytes: int = 0
    to_encode: list[int] = field(default_factory=list)  # the prompt, then each finished canvas to commit
    # The canvas being denoised (runner-owned tensors).
    canvas: torch.Tensor | None = None  # [C] ids
    history: torch.Tensor | None = None  # [S, C] last S argmax canvases, -1 before the first
    soft_embeds: torch.Tensor | None = None  # [C, H] self-conditioning input, None on the first step
    canvas_steps: int = 0
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
    def steps_left(self) -> int:
        """n in the temperature schedule: steps remaining including the one about to run (spec 6.2)."""
        return self.params.max_denoising_steps - self.canvas_steps
