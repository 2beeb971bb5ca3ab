"""The synchronous engine: requests in, one iteration per `step()`, events out."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from engine.config import EngineConfig
from engine.constraint import NUM_CANDIDATES, Constraint
from engine.device import check_device
from engine.memory import (
    MIN_CONTEXT,
    InsufficientMemoryError,
    MemorySplit,
    check_memory,
    free_memory_bytes,
    largest_encode,
    planned_split,
)
from engine.model_runner import ModelRunner, measure_activations
from engine.request import (
    BlockCommitted,
    CanvasInit,
    EngineEvent,
    EngineInfo,
    Failed,
    Finished,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    StepStats,
    Usage,
)
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence
from models.config import GenerationDefaults, ModelConfig, load_config
from models.diffusion_gemma import DiffusionGemma, Experts
from models.loader import load_model

logger = logging.getLogger(__name__)

LoadedModel = tuple[DiffusionGemma, ModelConfig, GenerationDefaults]


class Engine:
    """Continuous batching at denoising-step granularity: requests join and leave between iterations."""

    def __init__(self, config: EngineConfig, progress: bool = False, model: LoadedModel | None = None) -> None:
        """`model`: what load_model returns, already on the device, instead of loading config.checkpoint."""
        self.config = config
        device, dtype = config.torch_device, config.torch_dtype
        if model is None:
            check_device(device, requested=config.device is not None)
            check_memory(config, load_config(config.checkpoint)[0], free_memory_bytes(device))
            # Reference mode runs the reference's exact GEMM shapes; otherwise expert groups are padded so that
            # a sequence's numbers do not depend on its batch (see models.diffusion_gemma.Experts).
            model = load_model(
                config.checkpoint,
                dtype,
                device,
                progress,
                expert_row_alignment=1 if config.reference_mode else 4,
                quantization=config.quantization,
                device_class=config.device_class,
            )
        self.model, self.model_config, self.generation_defaults = model
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.memory = self._plan_memory(max_model_len)
        self.runner = ModelRunner(self.model, self.model_config, config, self.memory.kv, max_model_len)
        layout = self.runner.layout
        self.info = EngineInfo(
            max_model_len=max_model_len,
            vocab_size=self.model_config.vocab_size,
            canvas_length=self.model_config.canvas_length,
            max_num_seqs=config.max_num_seqs,
            stop_token_ids=tuple(self.generation_defaults.eos_token_ids),
            kv_budget_bytes=self.runner.budget.total_bytes,
            kv_page_tokens=layout.page_size,
            kv_page_bytes=layout.page_bytes,
            generation_defaults=self.generation_defaults,
            eager_buckets=self.runner.eager_buckets,
        )
        self.scheduler = Scheduler(
            self.runner.budget,
            config.max_num_seqs,
            config.max_waiting,
            lambda seq: self.info.kv_bytes_for(len(seq.prompt_ids), seq.params.max_tokens),
            prefill_chunk=None if config.reference_mode else config.prefill_chunk,
            max_batched_tokens=None if config.reference_mode else config.max_num_batched_tokens,
        )
        self._pending: list[EngineEvent] = []  # produced between steps (aborts)
        long_seqs = self.runner.budget.total_bytes // self.info.kv_bytes_for(MIN_CONTEXT, 1)
        logger.info(
            "engine ready: %s on %s, up to %d sequences, max_model_len %d; memory: %s (%d sequences of %d tokens fit)",
            dtype, device, config.max_num_seqs, max_model_len, self.memory, long_seqs, MIN_CONTEXT,
        )  # fmt: skip

    def _plan_memory(self, max_model_len: int) -> MemorySplit:
        """The split of the device's memory: the weights as loaded, the activation peak of the largest step and
        encode batch (on CUDA measured by a profiling pass, elsewhere the formula), the CUDA graphs' reserve, and the
        KV pool: kv_budget_fraction of what remains (the rest is the margin), unless a budget is given."""
        config, device = self.config, self.config.torch_device
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        settings = replace(config, max_model_len=max_model_len)
        w8a8 = any(isinstance(m, Experts) and m.path.weights == "fp8_w8a8" for m in self.model.modules())
        planned = planned_split(settings, self.model_config, weights, 0, w8a8)
        activations = planned.activations
        if device.type == "cuda":  # measured: the kernels and the allocator as they run here
            activations = measure_activations(
                self.model, self.model_config, config, max_model_len, largest_encode(settings)
            )
            torch.cuda.empty_cache()
        graphs, kv = planned.graphs, config.kv_budget_bytes
        if kv is None:
            left = free_memory_bytes(device) - activations - graphs
            if left <= 0:
                raise InsufficientMemoryError(
                    f"no memory is left for the KV cache on {device}: {MemorySplit(weights, activations, graphs, 0)},"
                    f" {free_memory_bytes(device) / 2**30:.2f} GiB free after loading; lower --max-num-seqs, "
                    "--max-num-batched-tokens or --max-model-len"
                )
            kv = int(left * config.kv_budget_fraction)
        return MemorySplit(weights, activations, graphs, kv)

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        constraint: Constraint | None = None,
        canvas: CanvasInit | None = None,
    ) -> None:
        """Queue a request; `canvas` starts its first canvas from given ids instead of noise. Raises
        InvalidRequestError (ContextLengthError: it can never fit) for invalid input, QueueFullError when the waiting
        queue is full."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.info.vocab_size
        if bad := [t for t in prompt_ids if not 0 <= t < vocab]:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if canvas is not None:
            canvas.check(self.info.canvas_length, vocab)
            if canvas.pinned and constraint is not None:  # the grammar's walk may rewrite any committed position
                raise InvalidRequestError("pinned canvas positions cannot be combined with a grammar", "pinned")
        resolved = params.resolve(self.generation_defaults, self.info.max_model_len, len(prompt_ids))
        seq = Sequence(request_id, list(prompt_ids), resolved, self.info.canvas_length, constraint, canvas)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request; it leaves the batch before the next iteration and its memory is reused."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            sent = seq.num_output_tokens + seq.streamed  # with the settled prefix already streamed
            usage = Usage(len(seq.prompt_ids), sent, seq.num_canvases, seq.num_denoise_steps)
            self._pending.append(Finished(request_id, FinishReason.ABORT, usage))

    def has_unfinished(self) -> bool:
        """True while a step has work: sequences to run, or events (aborts) to deliver."""
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def step(self) -> tuple[list[EngineEvent], StepStats]:
        """Admit, encode prompts and finished canvases, run one denoising step for every running sequence. An
        out-of-memory error fails only this iteration's sequences, whose memory is freed; the engine goes on."""
        events, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        try:
            return self._run(batch, events)
        except torch.OutOfMemoryError as exc:
            seqs = {seq.request_id: seq for seq in (*batch.admitted, *(s for s, _ in batch.encode), *batch.denoise)}
            logger.error(
                "out of memory in an iteration of %d encode tokens and %d denoising rows; failing its %d requests: %s",
                sum(n for _, n in batch.encode), len(batch.denoise), len(seqs), exc,
            )  # fmt: skip
            for request_id in seqs:
                self.scheduler.abort(request_id)
                events.append(Failed(request_id, "out of memory on the device; retry, or lower the load"))
            if self.config.torch_device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed iteration's blocks back before the next one
            return events, self._stats(events, 0, 0, 0.0, 0.0)

    def _run(self, batch: Batch, events: list[EngineEvent]) -> tuple[list[EngineEvent], StepStats]:
        for seq in batch.admitted:
            self.runner.allocate(seq)
        t0 = time.perf_counter()
        num_encoded = self.runner.encode(batch.encode) if batch.encode else 0
        encode_s = time.perf_counter() - t0
        denoise_s = 0.0
        if batch.denoise:
            argmax, stopped, prefixes, denoise_s = self.runner.denoise(batch.denoise)
            constrained = [
                seq for seq, tokens, is_stopped, prefix in zip(batch.denoise, argmax, stopped, prefixes, strict=True)
                if seq.constraint is not None and self.scheduler.commits(seq, is_stopped, tokens, prefix)
            ]  # fmt: skip
            candidates = self.runner.candidates(constrained, NUM_CANDIDATES) if constrained else []
            by_id = {seq.request_id: c for seq, c in zip(constrained, candidates, strict=True)}
            # Where each block that wants logprobs starts: the scheduler moves `streamed` and may release the slot.
            scored = {
                s.request_id: (s.slot, s.streamed, s.params.logprobs)
                for s in batch.denoise
                if s.params.logprobs is not None
            }
            committed = self.scheduler.after_step(batch.denoise, argmax, stopped, prefixes, by_id)
            events.extend(self._with_logprobs(committed, scored) if scored else committed)
        return events, self._stats(events, num_encoded, len(batch.denoise), encode_s, denoise_s)

    def _stats(
        self, events: list[EngineEvent], encoded: int, rows: int, encode_s: float, denoise_s: float
    ) -> StepStats:
        return StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_encode_tokens=encoded,
            num_denoise_rows=rows,
            num_output_tokens=sum(len(e.token_ids) for e in events if isinstance(e, BlockCommitted)),
            encode_s=encode_s,
            denoise_s=denoise_s,
            kv_bytes_used=self.scheduler.budget.used_bytes,
        )

    def _with_logprobs(self, events: list[EngineEvent], scored: dict[str, tuple[int, int, int]]) -> list[EngineEvent]:
        """`events` with logprobs on the blocks of the requests in `scored` (slot and first canvas position before
        the step's commits, and k), scored at the step that committed them: their tokens, then any stop token."""
        blocks = {e.request_id: e for e in events if isinstance(e, BlockCommitted) and e.request_id in scored}
        if not blocks:
            return events
        scores = self.runner.logprobs(
            [
                (slot, start, e.token_ids + ([] if e.stop_token_id is None else [e.stop_token_id]), k)
                for e in blocks.values()
                for slot, start, k in [scored[e.request_id]]
            ]
        )
        done = {rid: replace(e, logprobs=s) for (rid, e), s in zip(blocks.items(), scores, strict=True)}
        return [done.get(e.request_id, e) if isinstance(e, BlockCommitted) else e for e in events]

    def generate(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[EngineEvent]]:
        """Run requests to completion offline; returns each request's events in order."""
        for request_id, (prompt_ids, params) in requests.items():
            self.add_request(request_id, prompt_ids, params)
        out: dict[str, list[EngineEvent]] = {request_id: [] for request_id in requests}
        while self.has_unfinished():
            for event in self.step()[0]:
                out[event.request_id].append(event)
        return out
