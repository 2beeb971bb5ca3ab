"""Tensors for the engine: the KV pool and the canvas state, the batched encoder pass, and one denoising step
(decoder forward + sampler) over a bucket of slots. Makes no scheduling decisions.

A step's inputs are built on the host from the sequences' counters and copied to the device once; its outputs come
back in one device-to-host copy (the argmax canvases and the stop flags). Nothing in between waits on the device.
"""

from __future__ import annotations

import secrets
import time

import torch
import torch.nn.functional as F

from engine import noise
from engine.canvas import CanvasState
from engine.config import EngineConfig
from engine.kv_cache import (
    KVBudget,
    KVLayout,
    KVPool,
    decoder_attention,
    decoder_batch,
    encoder_attention,
    reference_decoder_attention,
)
from engine.sampler import fast_step, reference_step, schedule_temperature
from engine.sequence import Sequence
from models.config import ModelConfig
from models.diffusion_gemma import DiffusionGemma

# Flattened encoder batches are padded to a multiple of this many tokens: CPU GEMMs round a row differently when
# they see fewer than 12 rows that are not a multiple of 4, so alignment keeps a sequence's KV batch-independent.
TOKEN_ALIGNMENT = 4


def bucket_size(rows: int, max_rows: int) -> int:
    """The step's row count: the next power of two, so that few shapes are ever compiled or captured."""
    return min(max_rows, 1 << (rows - 1).bit_length())


class ModelRunner:
    def __init__(self, model: DiffusionGemma, config: ModelConfig, engine_config: EngineConfig, budget: int) -> None:
        self.model, self.config, self.engine_config = model, config, engine_config
        self.device, self.dtype = engine_config.torch_device, engine_config.torch_dtype
        self.reference = engine_config.reference_mode
        slots = engine_config.max_num_seqs
        self.layout = KVLayout(config, config.canvas_length, torch.empty((), dtype=self.dtype).element_size())
        num_pages = (budget - slots * self.layout.slot_bytes) // self.layout.page_bytes
        if num_pages < 1:
            raise ValueError(
                f"a KV budget of {budget / 2**20:.1f} MiB cannot hold the sliding windows of {slots} sequences "
                f"({slots * self.layout.slot_bytes / 2**20:.1f} MiB) and one page; raise it or lower max_num_seqs"
            )
        self.budget = KVBudget(num_pages, self.layout.page_bytes, slots)
        self.pool = KVPool(self.layout, slots, num_pages, self.device, self.dtype)
        self.canvases = CanvasState(slots, config.canvas_length, config.hidden_size, self.device, self.dtype)
        self.num_forwards = 0
        self.fault = None
        if engine_config.fault_injection:
            kind, _, at = engine_config.fault_injection.partition("@")
            self.fault = (kind, int(at))

    def allocate(self, seq: Sequence) -> None:
        """Zero a newly admitted sequence's pages and fix its random stream."""
        self.pool.clear(seq.pages)
        seq.length = 0
        seed = seq.params.seed
        if self.reference:
            if seed is not None:
                torch.manual_seed(seed)  # generate() reads the global generator (spec 6.3)
            return
        if seed is None:
            # temperature 0 is deterministic: a fixed seed also fixes the renoising draws.
            seed = 0 if seq.params.temperature == 0 else secrets.randbits(63)
        seq.seed = seed

    @torch.inference_mode()
    def encode(self, work: list[tuple[Sequence, int]]) -> int:
        """One causal pass over the next n pending tokens (prompt or canvas to commit) of each sequence, flattened.

        A sequence with nothing left pending starts its next canvas.
        """
        seqs, lengths = [s for s, _ in work], [n for _, n in work]
        starts = [sum(lengths[:i]) for i in range(len(seqs))]
        total = sum(lengths)
        if not self.reference:
            total = -(-total // TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT
        ids = torch.zeros(1, total, dtype=torch.long)
        positions = torch.zeros(1, total, dtype=torch.long)
        for seq, start, n in zip(seqs, starts, lengths, strict=True):
            ids[0, start : start + n] = torch.tensor(seq.to_encode[:n])
            positions[0, start : start + n] = torch.arange(seq.length, seq.length + n)
        attend = encoder_attention(self.pool, seqs, starts, lengths)
        self.model.encode(ids.to(self.device), positions.to(self.device), attend)
        for seq, n in work:
            seq.length += n
            seq.to_encode = seq.to_encode[n:]
            if not seq.to_encode:
                self._start_canvas(seq)
        return sum(lengths)

    def _start_canvas(self, seq: Sequence) -> None:
        c, vocab = self.config.canvas_length, self.config.vocab_size
        if self.reference:  # the global generator, shape [1, C] as generate() draws it
            canvas = torch.randint(0, vocab, (1, c), device=self.device)[0]
        else:
            key = noise.step_key(*(torch.tensor([x], device=self.device) for x in (seq.seed, seq.num_canvases, 0)))
            canvas = noise.initial_canvas(key, c, vocab)[0]
        self.canvases.start(seq.slot, canvas)
        seq.canvas_steps = 0

    @torch.inference_mode()
    def denoise(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[bool], float, float]:
        """One denoising step for each sequence: returns argmax canvases, stop flags, forward and sampler seconds
        (host time: on CUDA the split is of queueing, and the final copy waits for both)."""
        c = self.config.canvas_length
        t0 = time.perf_counter()
        self.num_forwards += 1
        if self.fault is not None and self.fault[1] == self.num_forwards:
            if self.fault[0] == "oom":
                raise torch.OutOfMemoryError("injected out-of-memory fault")
            raise SystemError("injected fatal fault")
        rows: list[Sequence | None] = [None] * bucket_size(max(s.slot for s in seqs) + 1, self.budget.num_slots)
        for seq in seqs:
            rows[seq.slot] = seq
        inputs = self._step_inputs(rows)
        positions = inputs["length"][:, None] + torch.arange(c, device=self.device)
        if self.reference:
            attend = reference_decoder_attention(self.pool, seqs[0], c)
        else:
            attend = decoder_attention(self.pool, decoder_batch(self.pool, rows, c))
        # A zero SC input is exactly "none" (spec 5, step 2); when every row starts a canvas the SC MLP is skipped.
        soft = self.canvases.soft[: len(rows)] if any(s.canvas_steps for s in seqs) else None
        hidden = self.model.denoise(self.canvases.canvas[: len(rows)], positions, attend, soft)
        self.last_hidden = hidden  # slot-indexed: what `candidates` reads for constrained rows
        t1 = time.perf_counter()
        if self.reference:
            result = reference_step(
                self.model, hidden, self.canvases.canvas[:1], inputs["temperature"][0], seqs[0].params.entropy_bound
            )
        else:
            result = fast_step(
                self.model,
                hidden,
                inputs["temperature"],
                inputs["proposal_factor"],
                inputs["entropy_bound"],
                noise.step_key(inputs["seed"], inputs["canvas"], inputs["step"]),
                self.engine_config.sampler_chunk,
                scaled_proposals=any(s.params.temperature not in (0.0, 1.0) for s in seqs),
            )
        stopped = self.canvases.update(
            result, inputs["denoising"], inputs["stability_threshold"], inputs["confidence_threshold"]
        )
        # The step's one device-to-host copy: every row's argmax canvas and its stop flag.
        out = torch.cat([self.canvases.argmax[: len(rows)], stopped[:, None].long()], dim=1).cpu().tolist()
        t2 = time.perf_counter()
        return [out[s.slot][:c] for s in seqs], [bool(out[s.slot][c]) for s in seqs], t1 - t0, t2 - t1

    @torch.inference_mode()
    def candidates(self, seqs: list[Sequence], k: int) -> list[list[list[int]]]:
        """The k most likely ids at each canvas position of the last step, for constrained rows that commit
        (engine/constraint.py). Raw-logit order, which softcap and temperature keep; a top-k per vocabulary chunk,
        merged as it goes, so nothing of [rows, C, V] exists. One device-to-host copy."""
        hidden = self.last_hidden[torch.tensor([s.slot for s in seqs], device=self.device)].flatten(0, 1)
        weight = self.model.embed_tokens.weight
        chunk = self.engine_config.sampler_chunk
        best_values = best_ids = None
        for start in range(0, weight.shape[0], chunk):
            values, ids = torch.topk(F.linear(hidden, weight[start : start + chunk]).float(), k, dim=-1)
            ids += start
            if best_values is not None:
                values, picked = torch.topk(torch.cat([best_values, values], -1), k, dim=-1)
                ids = torch.cat([best_ids, ids], -1).gather(-1, picked)
            best_values, best_ids = values, ids
        return best_ids.view(len(seqs), self.config.canvas_length, k).cpu().tolist()

    def _temperature(self, seq: Sequence) -> float:
        """The schedule (spec 6.2): reference mode computes it with the reference's own fp32 tensor arithmetic."""
        p = seq.params
        if self.reference:
            return float(schedule_temperature(seq.steps_left, p.t_min, p.t_max, p.max_denoising_steps))
        return p.t_min + (p.t_max - p.t_min) * seq.steps_left / p.max_denoising_steps

    def _step_inputs(self, rows: list[Sequence | None]) -> dict[str, torch.Tensor]:
        """Per-row step parameters from the host counters, in one host-to-device copy each; idle rows get inert
        values."""
        columns: dict[str, list] = {name: [] for name in _STEP_INPUTS}
        for seq in rows:
            p = seq.params if seq is not None else None
            values = {
                "denoising": seq is not None,
                "length": seq.length if seq else 0,
                "temperature": self._temperature(seq) if seq else 1.0,
                "proposal_factor": p.temperature if seq else 1.0,
                "entropy_bound": p.entropy_bound if seq else 1.0,
                "stability_threshold": p.stability_threshold if seq else 0,
                "confidence_threshold": p.confidence_threshold if seq else 0.0,
                "seed": seq.seed if seq else 0,
                "canvas": seq.num_canvases if seq else 0,
                "step": seq.canvas_steps + 1 if seq else 0,
            }
            for name, value in values.items():
                columns[name].append(value)
        return {
            name: torch.tensor(columns[name], dtype=dtype).to(self.device, non_blocking=True)
            for name, dtype in _STEP_INPUTS.items()
        }


_STEP_INPUTS = {
    "denoising": torch.bool,
    "length": torch.long,
    "temperature": torch.float32,
    "proposal_factor": torch.float32,
    "entropy_bound": torch.float32,
    "stability_threshold": torch.long,
    "confidence_threshold": torch.float32,
    "seed": torch.long,
    "canvas": torch.long,
    "step": torch.long,
}
