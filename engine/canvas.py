"""Every slot's canvas on the device: [max_num_seqs, C, ...] buffers indexed by the sequence's slot (spec 6.2).

A step reads and writes a bucket of slots [0, rows); rows that are idle or still encoding are computed but masked
out of every update, so the step's shapes depend on the bucket alone. The stability test needs only the last argmax
and how many steps in a row it has not changed: the last S argmax canvases equal this one exactly when that run
is at least S.

Pinned positions hold their input id for the rest of the canvas: it is their argmax and their next input whatever
the step proposed, and their self-conditioning input is that id's own embedding (the soft embedding of a certain
distribution). Pins come from the request (warm start, infill) and from settling: with settle_steps > 0, the
longest run of leading positions that are pinned or have kept their argmax with low entropy for settle_steps steps
is pinned too, so that it can be streamed before the canvas commits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.sampler import StepResult


class CanvasState:
    def __init__(self, num_slots: int, canvas_length: int, hidden: int, device: torch.device, dtype: torch.dtype):
        self.canvas = torch.zeros(num_slots, canvas_length, dtype=torch.long, device=device)  # next input ids
        self.argmax = torch.full((num_slots, canvas_length), -1, dtype=torch.long, device=device)  # last greedy canvas
        self.run = torch.zeros(num_slots, dtype=torch.long, device=device)  # steps the argmax has stayed the same
        self.soft = torch.zeros(num_slots, canvas_length, hidden, dtype=dtype, device=device)  # SC input; 0 = none
        self.pinned = torch.zeros(num_slots, canvas_length, dtype=torch.bool, device=device)
        # Per position: steps in a row its argmax has stayed the same with entropy below settle_entropy.
        self.streak = torch.zeros(num_slots, canvas_length, dtype=torch.long, device=device)

    def start(self, slot: int, canvas: torch.Tensor, pinned: torch.Tensor) -> None:
        """A fresh canvas [C] in `slot`: no argmax history, and a zero SC input (exactly the first step's none);
        `pinned` [C] bool marks the positions whose ids stay fixed."""
        self.canvas[slot], self.pinned[slot] = canvas, pinned
        self.argmax[slot], self.run[slot], self.soft[slot], self.streak[slot] = -1, 0, 0, 0

    def update(
        self,
        result: StepResult,
        inputs: dict[str, torch.Tensor],  # the step's per-row inputs (engine/request.py STEP_INPUTS)
        embed: Callable[[torch.Tensor], torch.Tensor],  # ids -> scaled embeddings, the SC input of a certain id
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's outcome for the denoising rows; returns [rows] bool, the canvases that commit now, and
        [rows] long, each row's count of leading pinned positions.

        A canvas commits when it stops (stable and confident), on its last step, or when it settles and its pinned
        prefix holds all the output it may still give or a stop token."""
        denoising, settle_steps = inputs["denoising"], inputs["settle_steps"]
        rows = result.argmax.shape[0]
        pinned = self.pinned[:rows]
        argmax = torch.where(pinned, self.canvas[:rows], result.argmax)
        same = argmax == self.argmax[:rows]
        unchanged = same.all(-1)
        run = torch.where(unchanged, self.run[:rows] + 1, 0)
        stopped = (run >= inputs["stability_threshold"]) & (result.mean_entropy < inputs["confidence_threshold"])
        streak = torch.where(same & (result.entropy < inputs["settle_entropy"][:, None]), self.streak[:rows] + 1, 0)
        settles = settle_steps > 0
        settled = pinned | ((streak >= settle_steps[:, None]) & settles[:, None])
        prefix_mask = settled.long().cumprod(-1)  # [rows, C] 1 up to the first position not settled
        prefix = prefix_mask.sum(-1)
        in_prefix = prefix_mask > 0
        # A settled prefix that holds a stop token, or all the output the request may still give, ends the canvas.
        stop_token = (argmax[..., None] == inputs["stop_token_ids"][:, None, :]).any(-1)  # [rows, C]
        full = (prefix >= inputs["tokens_left"]) | (stop_token & in_prefix).any(-1)
        commits = denoising & (stopped | inputs["last_step"] | (settles & full))
        keep = denoising[:, None]
        # A select, not `|`: inductor's CPU vectoriser miscompiles a bool | of an int64 comparison into this buffer.
        pinned = torch.where(keep & in_prefix, True, pinned)
        self.pinned[:rows] = pinned
        self.canvas[:rows] = torch.where(keep, torch.where(pinned, argmax, result.canvas), self.canvas[:rows])
        self.argmax[:rows] = torch.where(keep, argmax, self.argmax[:rows])
        self.run[:rows] = torch.where(denoising, run, self.run[:rows])
        self.streak[:rows] = torch.where(keep, streak, self.streak[:rows])
        soft = torch.where(pinned[..., None], embed(argmax), result.soft_embeds)
        self.soft[:rows] = torch.where(keep[..., None], soft, self.soft[:rows])
        return commits, prefix
