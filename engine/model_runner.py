"""Tensors for the engine: the KV pool and the canvas state, the batched encoder pass, and one denoising step (decoder
forward, sampler, canvas update) over a bucket of slots. Makes no scheduling decisions and writes no Sequence: `run`
reads a Batch and returns a StepOutput.

A step's inputs are built on the host from the sequences' counters (engine/request.py STEP_INPUTS) and copied to the
device once; its outputs come back in one device-to-host copy (the argmax canvases, the commit flags and the settled
prefixes). Nothing in between waits on the device.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from engine import noise
from engine.attention import decoder_attention, decoder_batch, encoder_attention
from engine.canvas import CanvasState
from engine.config import EngineConfig
from engine.constraint import NUM_CANDIDATES
from engine.graphs import StepGraphs, powers_of_two
from engine.kv_cache import KVLayout, KVPool, page_bucket, page_table
from engine.memory import LiveBytes
from engine.request import STEP_INPUTS, Logprob, Request, SamplingParams
from engine.sampler import StepResult, fast_step, merge_top_k, token_logprobs
from engine.scheduler import Batch, Chunk, RowOutput, Scorer, StepOutput
from engine.sequence import Sequence
from models.config import ModelConfig
from models.diffusion_gemma import DiffusionGemma

logger = logging.getLogger(__name__)


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
    layout = KVLayout.of(config, engine_config.torch_dtype)
    num_pages = sum(layout.pages_for(n) for n in chunks) + 1
    runner = ModelRunner(model, config, replace(engine_config, compile=False), num_pages, max_model_len)
    return runner.profile(engine_config.max_num_seqs, max_model_len, chunks)


class ModelRunner:
    def __init__(
        self,
        model: DiffusionGemma,
        config: ModelConfig,
        engine_config: EngineConfig,
        num_pages: int,
        max_model_len: int,
        num_sliding_pages: int = 0,
    ) -> None:
        self.model, self.config, self.engine_config = model, config, engine_config
        self.device, self.dtype = engine_config.torch_device, engine_config.torch_dtype
        self.num_slots = slots = engine_config.max_num_seqs
        self.layout = KVLayout.of(config, self.dtype)
        self.pool = KVPool(self.layout, slots, num_pages, self.device, self.dtype, num_sliding_pages)
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

    @property
    def eager_buckets(self) -> tuple[str, ...]:
        """The step buckets that were to be compiled (and captured) but run eager: "ROWSxPAGES", or "all"."""
        if self.graphs is None:
            return ("all",) if self.engine_config.compiled else ()
        return tuple(f"{rows}x{pages}" for rows, pages in self.graphs.eager)

    def run(self, batch: Batch) -> StepOutput:
        """Clear the admitted sequences' new pages and restore their cache hits' rings, encode the batch's chunks,
        start its canvases and run one denoising step for its denoising rows."""
        self.admit(batch.admitted)
        for restore in batch.restores:  # before the encode, which may write these store pages again
            self.pool.restore(restore.slot, restore.start, restore.end, restore.pages)
        start = time.perf_counter()
        if batch.encode:
            self.encode(batch.encode)
        for seq in batch.starts:
            self.start_canvas(seq)
        encoded = time.perf_counter()
        num_encoded = sum(len(chunk.token_ids) for chunk in batch.encode)
        if not batch.denoise:
            return StepOutput(num_encoded=num_encoded, encode_s=encoded - start)
        rows, scorer = self.denoise(batch.denoise)
        return StepOutput(rows, scorer, num_encoded, encoded - start, time.perf_counter() - encoded)

    def admit(self, seqs: list[Sequence]) -> None:
        """Zero newly admitted sequences' pages past their cached prefix."""
        if pages := [page for seq in seqs for page in seq.pages[seq.num_cached // self.layout.page_size :]]:
            self.pool.clear(pages)

    @torch.inference_mode()
    def encode(self, chunks: list[Chunk]) -> None:
        """One causal pass over every chunk, flattened (padded to the batch alignment, engine/config.py)."""
        lengths = [len(chunk.token_ids) for chunk in chunks]
        offsets = [sum(lengths[:i]) for i in range(len(chunks))]
        align = self.engine_config.batch_alignment
        total = -(-sum(lengths) // align) * align
        ids = torch.zeros(1, total, dtype=torch.long)
        positions = torch.zeros(1, total, dtype=torch.long)
        for chunk, at, n in zip(chunks, offsets, lengths, strict=True):
            ids[0, at : at + n] = torch.tensor(chunk.token_ids)
            positions[0, at : at + n] = torch.arange(chunk.start, chunk.start + n)
        attend = encoder_attention(self.pool, chunks, offsets, align, self.engine_config.encoder_key_block)
        self.model.encode(ids.to(self.device), positions.to(self.device), attend)

    def start_canvas(self, seq: Sequence) -> None:
        """A fresh canvas in the sequence's slot: noise, with its CanvasInit's ids and pins on the first."""
        c = self.config.canvas_length
        canvas = self.noise(seq)  # drawn even where a warm start replaces it, as generate() draws it
        pinned = torch.zeros(c, dtype=torch.bool)
        if (init := seq.canvas_init) is not None:
            given = torch.tensor([-1 if t is None else t for t in init.ids], dtype=torch.long, device=self.device)
            canvas[: len(given)] = torch.where(given >= 0, given, canvas[: len(given)])
            for start, end in init.pinned:
                pinned[start:end] = True
        self.canvases.start(seq.slot, canvas, pinned.to(self.device))

    def noise(self, seq: Sequence) -> torch.Tensor:
        """[C] the canvas's initial noise, keyed by (seed, canvas index)."""
        key = torch.tensor([noise.step_key(seq.seed, seq.num_canvases, 0)], device=self.device)
        return noise.initial_canvas(key, self.config.canvas_length, self.config.vocab_size)[0]

    @torch.no_grad()  # not inference_mode: see engine/graphs.py
    def denoise(self, seqs: list[Sequence]) -> tuple[list[RowOutput], Scorer]:
        """One denoising step for each sequence: each row's outcome, with grammar candidates for the constrained rows
        that commit, and a scorer of committed tokens at this step."""
        c = self.config.canvas_length
        rows: list[Sequence | None] = [None] * bucket_size(max(s.slot for s in seqs) + 1, self.num_slots)
        for seq in seqs:
            rows[seq.slot] = seq
        out, hidden = self.forward(seqs, self.step_inputs(rows, page_bucket(max(len(s.pages) for s in seqs))))
        out = out.cpu().tolist()  # the step's one device-to-host copy
        slots = [seq.slot for seq in seqs]
        constrained = [s.slot for s in seqs if s.constraint is not None and out[s.slot][c]]
        candidates = dict(zip(constrained, self.candidates(hidden, constrained), strict=True)) if constrained else {}
        outputs = [
            RowOutput(out[slot][:c], bool(out[slot][c]), out[slot][c + 1], candidates.get(slot)) for slot in slots
        ]
        return outputs, partial(self.logprobs, hidden, slots)

    def forward(self, seqs: list[Sequence], inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step for these host inputs: the captured or compiled graph of its bucket, else eager."""
        if self.graphs is not None:
            return self.graphs(inputs)
        inputs = {name: x.to(self.device, non_blocking=True) for name, x in inputs.items()}
        # Eager only: a batch of first steps skips the SC MLP, and factors of 0 or 1 skip the scaled exp pass. Both
        # give the same bits as the full computation, which is what a compiled step runs.
        return self.step(
            inputs,
            self_condition=any(s.canvas_steps for s in seqs),
            scaled_proposals=any(s.params.temperature not in (0.0, 1.0) for s in seqs),
        )

    def step(
        self, inputs: dict[str, torch.Tensor], self_condition: bool, scaled_proposals: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder forward, the sampler and the canvas update over a bucket of rows, from device tensors only
        (what torch.compile traces and a CUDA graph captures). Returns [rows, C + 2], each row's argmax canvas,
        its commit flag and its count of leading pinned positions, and the final hidden states [rows, C, H]."""
        rows, c = inputs["length"].shape[0], self.config.canvas_length
        positions = inputs["length"][:, None] + torch.arange(c, device=self.device)
        attend = decoder_attention(self.pool, decoder_batch(self.pool, inputs["table"], inputs["length"], c))
        soft = self.canvases.soft[:rows] if self_condition else None  # a zero SC input is exactly none (spec 5)
        hidden = self.model.denoise(self.canvases.canvas[:rows], positions, attend, soft)
        pinned, chunk = self.canvases.pinned[:rows], self.engine_config.sampler_chunk
        result = fast_step(self.model, hidden, inputs, inputs["noise_key"], pinned, chunk, scaled_proposals)
        return self.update(result, inputs), hidden

    def update(self, result: StepResult, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Store the step in the canvas state; returns [rows, C + 2]: each row's argmax canvas, its commit flag and
        its count of leading pinned positions."""
        commits, prefix = self.canvases.update(result, inputs, self.model.embed)
        return torch.cat([self.canvases.argmax[: commits.shape[0]], commits[:, None].long(), prefix[:, None]], dim=1)

    def step_inputs(self, rows: list[Sequence | None], pages: int) -> dict[str, torch.Tensor]:
        """The step's inputs on the host, from the sequence in each slot of the bucket (None: idle or encoding, given
        inert values), with a page table `pages` wide."""
        inputs = {
            spec.name: torch.tensor([spec.row(seq) for seq in rows], dtype=getattr(torch, spec.dtype))
            for spec in STEP_INPUTS
        }
        inputs["table"] = torch.tensor(page_table(rows, pages))
        return inputs

    @torch.inference_mode()
    def candidates(self, hidden: torch.Tensor, slots: list[int]) -> list[list[list[int]]]:
        """The NUM_CANDIDATES most likely ids at each canvas position of these slots' rows of the step's hidden
        states (engine/constraint.py). Raw-logit order, which softcap and temperature keep; a top-k per vocabulary
        chunk, merged as it goes, so nothing of [rows, C, V] exists. One device-to-host copy."""
        hidden = hidden[torch.tensor(slots, device=self.device)].flatten(0, 1)
        weight, chunk, k = self.model.embed_tokens.weight, self.engine_config.sampler_chunk, NUM_CANDIDATES
        best = None
        for start in range(0, weight.shape[0], chunk):
            values, ids = torch.topk(F.linear(hidden, weight[start : start + chunk]).float(), k, dim=-1)
            best = merge_top_k(best, values, ids.add_(start), k)
        return best[1].view(len(slots), self.config.canvas_length, k).cpu().tolist()

    @torch.inference_mode()
    def logprobs(
        self, hidden: torch.Tensor, slots: list[int], blocks: list[tuple[int, int, list[int], int]]
    ) -> list[tuple[Logprob, ...]]:
        """Score committed tokens at a step's hidden states: for each (row, first canvas position, token ids, k) the
        tokens' logprobs with k alternatives each (sampler.token_logprobs). Only rows that asked pay, once per block
        they commit; one device-to-host copy."""
        rows = torch.cat([hidden[slots[row], start : start + len(ids)] for row, start, ids, _ in blocks])
        tokens = torch.tensor([t for *_, ids, _ in blocks for t in ids], device=self.device)
        widest = max(k for *_, k in blocks)
        chosen, values, top = token_logprobs(self.model, rows, tokens, widest, self.engine_config.sampler_chunk)
        # fp64 holds every id exactly, so one copy carries all three.
        host = iter(torch.cat([x.double() for x in (chosen[:, None], values, top)], 1).cpu().tolist())
        return [tuple(_logprob(t, next(host), widest, k) for t in ids) for *_, ids, k in blocks]

    def profile(self, rows: int, context: int, chunks: list[int]) -> int:
        """The activation peak, in bytes, of the largest encode batch (a new prompt of each of `chunks` tokens, in
        slots 0, 1, ... and the pool's pages in order) and of a denoising step of `rows` idle rows with a page table
        as wide as `context` tokens need, run as this runner runs them: on CUDA the allocator's peak above what was
        allocated before, elsewhere LiveBytes."""
        work, first = [], 1
        for slot, n in enumerate(chunks):
            num_pages, request = self.layout.pages_for(n), Request(f"profile-{slot}", (0,) * n)
            pages, first = list(range(first, first + num_pages)), first + num_pages
            seq = Sequence(request, SamplingParams(), 0, num_pages, self.config.canvas_length, slot=slot, pages=pages)
            work.append(Chunk(seq, 0, [0] * n))
        self.admit([chunk.seq for chunk in work])
        width = page_bucket(self.layout.pages_for(context + self.config.canvas_length))
        inputs = {name: x.to(self.device) for name, x in self.step_inputs([None] * rows, width).items()}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        tracker = LiveBytes()
        with contextlib.nullcontext() if cuda else tracker:
            self.encode(work)
            with torch.no_grad():
                self.step(inputs, self_condition=True, scaled_proposals=True)
        if cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        return tracker.peak


def _logprob(token: int, row: list[float], widest: int, k: int) -> Logprob:
    """A token's entry from its row of `logprobs`' copy: its logprob, `widest` top logprobs, then their ids."""
    return Logprob(token, row[0], tuple(zip(map(int, row[1 + widest : 1 + widest + k]), row[1 : 1 + k], strict=True)))
