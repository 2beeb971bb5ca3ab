"""Tensors for the engine: the KV pool and the canvas state, the batched encoder pass, and one denoising step
(decoder forward + sampler) over a bucket of slots. Makes no scheduling decisions.

A step's inputs are built on the host from the sequences' counters and copied to the device once; its outputs come
back in one device-to-host copy (the argmax canvases and the stop flags). Nothing in between waits on the device.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from engine import noise
from engine.canvas import CanvasState
from engine.config import EngineConfig
from engine.graphs import StepGraphs, powers_of_two
from engine.kv_cache import (
    KVBudget,
    KVLayout,
    KVPool,
    decoder_attention,
    decoder_batch,
    encoder_attention,
    page_bucket,
    page_table,
    reference_decoder_attention,
)
from engine.memory import LiveBytes
from engine.request import Logprob, SamplingParams
from engine.sampler import StepResult, fast_step, merge_top_k, reference_step, schedule_temperature, token_logprobs
from engine.sequence import Sequence
from models.config import GenerationDefaults, ModelConfig
from models.diffusion_gemma import DiffusionGemma

logger = logging.getLogger(__name__)

# Flattened encoder batches are padded to a multiple of this many tokens: CPU GEMMs round a row differently when
# they see fewer than 12 rows that are not a multiple of 4, so alignment keeps a sequence's KV batch-independent.
TOKEN_ALIGNMENT = 4


def bucket_size(rows: int, max_rows: int) -> int:
    """The step's row count: the next power of two, so that few shapes are ever compiled or captured."""
    return min(max_rows, 1 << (rows - 1).bit_length())


def row_buckets(max_rows: int) -> list[int]:
    """Every value bucket_size takes."""
    return sorted({bucket_size(rows, max_rows) for rows in range(1, max_rows + 1)})


def measure_activations(
    model: DiffusionGemma, config: ModelConfig, engine_config: EngineConfig, max_model_len: int, chunks: list[int]
) -> int:
    """The activation peak of the largest step (max_num_seqs rows at max_model_len) and encode batch (`chunks`),
    measured by an uncompiled runner that holds only the KV memory this needs (ModelRunner.profile)."""
    layout = KVLayout(config, config.canvas_length, torch.empty((), dtype=engine_config.torch_dtype).element_size())
    rows = engine_config.max_num_seqs
    budget = rows * layout.slot_bytes + (sum(layout.pages_for(n) for n in chunks) + 1) * layout.page_bytes
    runner = ModelRunner(model, config, replace(engine_config, compile=False), budget, max_model_len)
    return runner.profile(rows, max_model_len, chunks)


class ModelRunner:
    def __init__(
        self, model: DiffusionGemma, config: ModelConfig, engine_config: EngineConfig, budget: int, max_model_len: int
    ) -> None:
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
        self.graphs: StepGraphs | None = None
        if engine_config.compiled:
            longest = min(max_model_len, engine_config.max_capture_len) + config.canvas_length
            widest = page_bucket(min(num_pages, self.layout.pages_for(longest)))
            try:
                self.graphs = StepGraphs(
                    self.step, self.step_inputs, row_buckets(slots), powers_of_two(2, widest), self.device,
                    engine_config.cuda_graphs,
                )  # fmt: skip
            except Exception:  # a compiler or driver failure must not keep the server from starting
                if engine_config.compile:  # asked for explicitly: fail loudly
                    raise
                logger.exception("compiling the denoising step failed; running it eager (--no-compile hides this)")
        self.num_forwards = 0
        self.fault = None
        if engine_config.fault_injection:
            kind, _, at = engine_config.fault_injection.partition("@")
            self.fault = (kind, int(at))

    @property
    def eager_buckets(self) -> tuple[str, ...]:
        """The step buckets that were to be compiled (and captured) but run eager: "ROWSxPAGES", or "all"."""
        if self.graphs is None:
            return ("all",) if self.engine_config.compiled else ()
        return tuple(f"{rows}x{pages}" for rows, pages in self.graphs.eager)

    def profile(self, rows: int, context: int, chunks: list[int]) -> int:
        """The activation peak, in bytes, of the largest encode batch (a new prompt of each of `chunks` tokens) and
        of a denoising step of `rows` idle rows with a page table as wide as `context` tokens need, run as this
        runner runs them: on CUDA the allocator's peak above what was allocated before, elsewhere LiveBytes. Takes
        pages for the prompts from the pool and gives them back."""
        seqs = []
        for i, n in enumerate(chunks):
            params = SamplingParams(max_tokens=1).resolve(GenerationDefaults(), n + 1, n)
            seq = Sequence(f"profile-{i}", [0] * n, params, self.config.canvas_length, None, None)
            seq.slot, seq.pages = self.budget.allocate(self.layout.pages_for(n) * self.layout.page_bytes)
            self.allocate(seq)
            seq.to_encode = list(seq.prompt_ids)
            seqs.append(seq)
        width = page_bucket(self.layout.pages_for(context + self.config.canvas_length))
        inputs = {name: x.to(self.device) for name, x in self.step_inputs([None] * rows, width).items()}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        tracker = LiveBytes()
        with contextlib.nullcontext() if cuda else tracker:
            self.encode([(seq, n) for seq, n in zip(seqs, chunks, strict=True)])
            with torch.no_grad():
                self.step(inputs, self_condition=True, scaled_proposals=True)
        for seq in seqs:
            self.budget.free(seq.slot, seq.pages)
        if cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        return tracker.peak

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
        # Noise is drawn even where a warm start replaces it, as generate() draws it with decoder_input_ids.
        if self.reference:  # the global generator, shape [1, C] as generate() draws it
            canvas = torch.randint(0, vocab, (1, c), device=self.device)[0]
        else:
            key = noise.step_key(*(torch.tensor([x], device=self.device) for x in (seq.seed, seq.num_canvases, 0)))
            canvas = noise.initial_canvas(key, c, vocab)[0]
        pinned = torch.zeros(c, dtype=torch.bool)
        if (init := seq.canvas_init) is not None and seq.num_canvases == 0:
            given = torch.tensor([-1 if t is None else t for t in init.ids], dtype=torch.long, device=self.device)
            canvas[: len(given)] = torch.where(given >= 0, given, canvas[: len(given)])
            for start, end in init.pinned:
                pinned[start:end] = True
        self.canvases.start(seq.slot, canvas, pinned.to(self.device))
        seq.canvas_steps, seq.pinned_prefix, seq.streamed = 0, 0, 0

    @torch.no_grad()  # not inference_mode: see engine/graphs.py
    def denoise(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[bool], list[int], float]:
        """One denoising step for each sequence: returns argmax canvases, stop flags, the counts of leading pinned
        positions (what is settled), and the step's seconds."""
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
        inputs = self.step_inputs(rows, page_bucket(max(len(s.pages) for s in seqs)))
        if self.graphs is not None:
            out, hidden = self.graphs(inputs)
        else:
            inputs = {name: x.to(self.device, non_blocking=True) for name, x in inputs.items()}
            if self.reference:
                out, hidden = self._reference_step(seqs[0], inputs)
            else:
                # Eager only: a batch of first steps skips the SC MLP, and factors of 0 or 1 skip the scaled exp
                # pass. Both give the same bits as the full computation, which is what a compiled step runs.
                out, hidden = self.step(
                    inputs,
                    self_condition=any(s.canvas_steps for s in seqs),
                    scaled_proposals=any(s.params.temperature not in (0.0, 1.0) for s in seqs),
                )
        self.last_hidden = hidden  # slot-indexed: what `candidates` reads for constrained rows that commit
        out = out.cpu().tolist()  # the step's one device-to-host copy
        rows = [out[s.slot] for s in seqs]
        return [r[:c] for r in rows], [bool(r[c]) for r in rows], [r[c + 1] for r in rows], time.perf_counter() - t0

    def step(
        self, inputs: dict[str, torch.Tensor], self_condition: bool, scaled_proposals: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder forward, the sampler and the canvas update over a bucket of rows, from device tensors only
        (what torch.compile traces and a CUDA graph captures). Returns [rows, C + 2], each row's argmax canvas,
        its stop flag and its count of leading pinned positions, and the final hidden states [rows, C, H]."""
        rows, c = inputs["length"].shape[0], self.config.canvas_length
        positions = inputs["length"][:, None] + torch.arange(c, device=self.device)
        attend = decoder_attention(self.pool, decoder_batch(self.pool, inputs["table"], inputs["length"], c))
        soft = self.canvases.soft[:rows] if self_condition else None  # a zero SC input is exactly none (spec 5)
        hidden = self.model.denoise(self.canvases.canvas[:rows], positions, attend, soft)
        result = fast_step(
            self.model,
            hidden,
            inputs["temperature"],
            inputs["proposal_factor"],
            inputs["entropy_bound"],
            noise.step_key(inputs["seed"], inputs["canvas"], inputs["step"]),
            self.canvases.pinned[:rows],
            self.engine_config.sampler_chunk,
            scaled_proposals,
        )
        return self._update(result, inputs), hidden

    def _reference_step(self, seq: Sequence, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row as generate() runs it: exact keys, its own SDPA calls, the global generator."""
        c = self.config.canvas_length
        positions = seq.length + torch.arange(c, device=self.device)[None]
        attend = reference_decoder_attention(self.pool, seq, c)
        soft = self.canvases.soft[:1] if seq.canvas_steps else None
        hidden = self.model.denoise(self.canvases.canvas[:1], positions, attend, soft)
        result = reference_step(
            self.model,
            hidden,
            self.canvases.canvas[:1],
            self.canvases.pinned[:1],
            inputs["temperature"][0],
            seq.params.entropy_bound,
        )
        return self._update(result, inputs), hidden

    @torch.inference_mode()
    def candidates(self, seqs: list[Sequence], k: int) -> list[list[list[int]]]:
        """The k most likely ids at each canvas position of the last step, for constrained rows that commit
        (engine/constraint.py). Raw-logit order, which softcap and temperature keep; a top-k per vocabulary chunk,
        merged as it goes, so nothing of [rows, C, V] exists. One device-to-host copy."""
        hidden = self.last_hidden[torch.tensor([s.slot for s in seqs], device=self.device)].flatten(0, 1)
        weight = self.model.embed_tokens.weight
        chunk = self.engine_config.sampler_chunk
        best = None
        for start in range(0, weight.shape[0], chunk):
            values, ids = torch.topk(F.linear(hidden, weight[start : start + chunk]).float(), k, dim=-1)
            best = merge_top_k(best, values, ids.add_(start), k)
        return best[1].view(len(seqs), self.config.canvas_length, k).cpu().tolist()

    @torch.inference_mode()
    def logprobs(self, blocks: list[tuple[int, int, list[int], int]]) -> list[tuple[Logprob, ...]]:
        """Score committed tokens at the last step: for each (slot, first canvas position, token ids, k) the tokens'
        logprobs with k alternatives each (sampler.token_logprobs). Only rows that asked pay, once per block they
        commit; one device-to-host copy."""
        hidden = torch.cat([self.last_hidden[slot, start : start + len(ids)] for slot, start, ids, _ in blocks])
        tokens = torch.tensor([t for *_, ids, _ in blocks for t in ids], device=self.device)
        widest = max(k for *_, k in blocks)
        chosen, values, top = token_logprobs(self.model, hidden, tokens, widest, self.engine_config.sampler_chunk)
        # fp64 holds every id exactly, so one copy carries all three.
        rows = iter(torch.cat([x.double() for x in (chosen[:, None], values, top)], 1).cpu().tolist())
        return [tuple(_logprob(t, next(rows), widest, k) for t in ids) for *_, ids, k in blocks]

    def _update(self, result: StepResult, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Store the step in the canvas state; returns [rows, C + 2]: each row's argmax canvas, its stop flag and
        its count of leading pinned positions."""
        stopped, prefix = self.canvases.update(
            result,
            inputs["denoising"],
            inputs["stability_threshold"],
            inputs["confidence_threshold"],
            inputs["settle_steps"],
            inputs["settle_entropy"],
            self.model.embed,
        )
        return torch.cat([self.canvases.argmax[: stopped.shape[0]], stopped[:, None].long(), prefix[:, None]], dim=1)

    def _temperature(self, seq: Sequence) -> float:
        """The schedule (spec 6.2): reference mode computes it with the reference's own fp32 tensor arithmetic."""
        p = seq.params
        if self.reference:
            return float(schedule_temperature(seq.steps_left, p.t_min, p.t_max, p.max_denoising_steps))
        return p.t_min + (p.t_max - p.t_min) * seq.steps_left / p.max_denoising_steps

    def step_inputs(self, rows: list[Sequence | None], pages: int) -> dict[str, torch.Tensor]:
        """The step's inputs on the host, from the counters of the sequence in each slot of the bucket (None: idle
        or encoding, given inert values), with a page table `pages` wide."""
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
                "settle_steps": p.settle_steps if seq and seq.settles else 0,
                "settle_entropy": p.settle_entropy if seq else 0.0,
            }
            for name, value in values.items():
                columns[name].append(value)
        inputs = {name: torch.tensor(columns[name], dtype=dtype) for name, dtype in _STEP_INPUTS.items()}
        inputs["table"] = torch.tensor(page_table(rows, pages))
        return inputs


def _logprob(token: int, row: list[float], widest: int, k: int) -> Logprob:
    """A token's entry from its row of `logprobs`' copy: its logprob, `widest` top logprobs, then their ids."""
    return Logprob(token, row[0], tuple(zip(map(int, row[1 + widest : 1 + widest + k]), row[1 : 1 + k], strict=True)))


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
    "settle_steps": torch.long,
    "settle_entropy": torch.float32,
}
