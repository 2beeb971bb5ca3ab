"""Every slot's canvas on the device: [max_num_seqs, C, ...] buffers indexed by the sequence's slot (spec 6.2).

A step reads and writes a bucket of slots [0, rows); rows that are idle or still encoding are computed but masked
out of every update, so the step's shapes depend on the bucket alone. The stability test needs only the last argmax
and how many steps in a row it has not changed: the last S argmax canvases equal this one exactly when that run
is at least S.
"""

from __future__ import annotations

import torch

from engine.sampler import StepResult


class CanvasState:
    def __init__(self, num_slots: int, canvas_length: int, hidden: int, device: torch.device, dtype: torch.dtype):
        self.canvas = torch.zeros(num_slots, canvas_length, dtype=torch.long, device=device)  # next input ids
        self.argmax = torch.full((num_slots, canvas_length), -1, dtype=torch.long, device=device)  # last greedy canvas
        self.run = torch.zeros(num_slots, dtype=torch.long, device=device)  # steps the argmax has stayed the same
        self.soft = torch.zeros(num_slots, canvas_length, hidden, dtype=dtype, device=device)  # SC input; 0 = none

    def start(self, slot: int, canvas: torch.Tensor) -> None:
        """A fresh canvas [C] in `slot`: no argmax history, and a zero SC input (exactly the first step's none)."""
        self.canvas[slot] = canvas
        self.argmax[slot], self.run[slot], self.soft[slot] = -1, 0, 0

    def update(
        self,
        result: StepResult,
        denoising: torch.Tensor,  # [rows] bool: the rows this step is for
        stability_threshold: torch.Tensor,  # [rows] long
        confidence_threshold: torch.Tensor,  # [rows] fp32
    ) -> torch.Tensor:
        """Store the step's outcome for the denoising rows; returns [rows] bool: canvases that may stop now."""
        rows = denoising.shape[0]
        unchanged = (result.argmax == self.argmax[:rows]).all(-1)
        run = torch.where(unchanged, self.run[:rows] + 1, 0)
        stopped = denoising & (run >= stability_threshold) & (result.mean_entropy < confidence_threshold)
        keep = denoising[:, None]
        self.canvas[:rows] = torch.where(keep, result.canvas, self.canvas[:rows])
        self.argmax[:rows] = torch.where(keep, result.argmax, self.argmax[:rows])
        self.run[:rows] = torch.where(denoising, run, self.run[:rows])
        self.soft[:rows] = torch.where(keep[..., None], result.soft_embeds, self.soft[:rows])
        return stopped
