"""Tensors for the engine: per-sequence KV memory and generators, the batched encoder pass, and one denoising step
(decoder forward + sampler) over every running canvas. Makes no scheduling decisions.
"""

from __future__ import annotations

import secrets
import time

import torch

from engine.config import EngineConfig
from engine.kv_cache import SequenceKV, commit_encoded, decoder_attention, encoder_attention
from engine.sampler import StepResult, fast_step, initial_canvas, reference_step, schedule_temperature
from engine.sequence import Sequence, kv_capacity
from models.config import ModelConfig
from models.diffusion_gemma import DiffusionGemma

# Flattened encoder batches are padded to a multiple of this many tokens: CPU GEMMs round a row differently when
# they see fewer than 12 rows that are not a multiple of 4, so alignment keeps a sequence's KV batch-independent.
TOKEN_ALIGNMENT = 4


class ModelRunner:
    def __init__(self, model: DiffusionGemma, config: ModelConfig, engine_config: EngineConfig) -> None:
        self.model, self.config, self.engine_config = model, config, engine_config
        self.device, self.dtype = engine_config.torch_device, engine_config.torch_dtype
        self.reference = engine_config.reference_mode
        self.num_forwards = 0
        self.fault = None
        if engine_config.fault_injection:
            kind, _, at = engine_config.fault_injection.partition("@")
            self.fault = (kind, int(at))

    def kv_bytes(self, seq: Sequence) -> int:
        return self.kv_bytes_for(len(seq.prompt_ids), seq.params.max_tokens)

    def kv_bytes_for(self, prompt_len: int, max_tokens: int) -> int:
        """KV bytes a request of this shape is charged (prompt + whole canvases)."""
        capacity = kv_capacity(prompt_len, max_tokens, self.config.canvas_length)
        return SequenceKV.num_bytes(self.config, capacity, self.dtype)

    def allocate(self, seq: Sequence) -> None:
        """KV memory and the random stream of a newly admitted sequence."""
        seq.kv = SequenceKV(self.config, seq.kv_capacity, self.device, self.dtype)
        seed = seq.params.seed
        if self.reference:
            if seed is not None:
                torch.manual_seed(seed)  # generate() reads the global generator (spec 6.3)
            return
        if seed is None:
            # temperature 0 is deterministic: a fixed seed also fixes the renoising draws.
            seed = 0 if seq.params.temperature == 0 else secrets.randbits(63)
        seq.generator = torch.Generator(device=self.device).manual_seed(seed)

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
            positions[0, start : start + n] = torch.arange(seq.kv.length, seq.kv.length + n)
        kvs = [s.kv for s in seqs]
        self.model.encode(ids.to(self.device), positions.to(self.device), encoder_attention(kvs, starts, lengths))
        commit_encoded(kvs, lengths)
        for seq, n in work:
            seq.to_encode = seq.to_encode[n:]
            if not seq.to_encode:
                self._start_canvas(seq)
        return sum(lengths)

    def _start_canvas(self, seq: Sequence) -> None:
        c = self.config.canvas_length
        seq.canvas = initial_canvas(c, self.config.vocab_size, seq.generator, self.device)
        seq.history = torch.full((seq.params.stability_threshold, c), -1, dtype=torch.long, device=self.device)
        seq.soft_embeds, seq.canvas_steps = None, 0

    @torch.inference_mode()
    def denoise(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[bool], float, float]:
        """One denoising step for each sequence: returns argmax canvases, stop flags, forward and sampler seconds."""
        c = self.config.canvas_length
        t0 = time.perf_counter()
        self.num_forwards += 1
        if self.fault is not None and self.fault[1] == self.num_forwards:
            if self.fault[0] == "oom":
                raise torch.OutOfMemoryError("injected out-of-memory fault")
            raise SystemError("injected fatal fault")
        canvas = torch.stack([s.canvas for s in seqs])
        positions = torch.stack([torch.arange(s.kv.length, s.kv.length + c, device=self.device) for s in seqs])
        soft = None
        if any(s.soft_embeds is not None for s in seqs):
            # A zero soft embedding is exactly the first step's "no SC" input (spec 5, step 2).
            zeros = torch.zeros(c, self.config.hidden_size, dtype=self.dtype, device=self.device)
            soft = torch.stack([zeros if s.soft_embeds is None else s.soft_embeds for s in seqs])
        hidden = self.model.denoise(canvas, positions, decoder_attention([s.kv for s in seqs]), soft)
        self._sync()
        t1 = time.perf_counter()
        result = self._sample(seqs, hidden, canvas)
        stopped = self._update_canvases(seqs, result)
        argmax = result.argmax.tolist()
        self._sync()
        return argmax, stopped, t1 - t0, time.perf_counter() - t1

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor, canvas: torch.Tensor) -> StepResult:
        temps = [
            schedule_temperature(s.steps_left, s.params.t_min, s.params.t_max, s.params.max_denoising_steps)
            for s in seqs
        ]
        if self.reference:
            return reference_step(self.model, hidden, canvas, temps[0], seqs[0].params.entropy_bound)
        return fast_step(
            self.model,
            hidden,
            canvas,
            torch.stack(temps),
            [s.params.temperature for s in seqs],
            torch.tensor([s.params.entropy_bound for s in seqs]),
            [s.generator for s in seqs],
            self.engine_config.sampler_chunk,
        )

    def _update_canvases(self, seqs: list[Sequence], result: StepResult) -> list[bool]:
        """Store each row's next canvas and SC input; stop a canvas when stable and confident (spec 6.2)."""
        stopped = []
        for i, seq in enumerate(seqs):
            argmax = result.argmax[i]
            stable = bool((seq.history == argmax).all()) if seq.params.stability_threshold else True
            if seq.params.stability_threshold:
                seq.history = torch.cat([seq.history[1:], argmax[None]])
            confident = bool(result.mean_entropy[i] < seq.params.confidence_threshold)
            stopped.append(stable and confident)
            seq.canvas, seq.soft_embeds = result.canvas[i], result.soft_embeds[i]
        return stopped

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
