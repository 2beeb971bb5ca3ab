"""The synchronous engine: requests in, one iteration per `step()`, events out."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from engine.config import EngineConfig
from engine.device import check_device
from engine.kv_cache import KVBudget, KVLayout
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
from engine.prefix_cache import PrefixCache
from engine.reference_runner import ReferenceRunner
from engine.request import BlockCommitted, EngineEvent, EngineInfo, Failed, Request, SamplingParams, StepStats
from engine.scheduler import Batch, Scheduler, StepOutput
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
            model = load_model(
                config.checkpoint,
                dtype,
                device,
                progress,
                expert_row_alignment=config.batch_alignment,
                quantization=config.quantization,
                device_class=config.device_class,
            )
        self.model, self.model_config, self.generation_defaults = model
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.memory = self._plan_memory(max_model_len)
        runner = ReferenceRunner if config.reference_mode else ModelRunner
        layout = KVLayout.of(self.model_config, dtype)
        cache_fraction = config.prefix_cache_fraction if config.prefix_caching else 0.0
        num_pages, num_sliding = layout.split(self.memory.kv, config.max_num_seqs, cache_fraction)
        self.runner = runner(self.model, self.model_config, config, num_pages, max_model_len, num_sliding)
        self.info = EngineInfo(
            max_model_len=max_model_len,
            vocab_size=self.model_config.vocab_size,
            canvas_length=self.model_config.canvas_length,
            max_num_seqs=config.max_num_seqs,
            stop_token_ids=tuple(self.generation_defaults.eos_token_ids),
            kv_num_pages=num_pages,
            kv_page_tokens=layout.page_size,
            kv_page_bytes=layout.page_bytes,
            generation_defaults=self.generation_defaults,
            eager_buckets=self.runner.eager_buckets,
            prefix_caching=config.prefix_caching,
            prefix_cache_sliding_pages=num_sliding,
            prefix_cache_sliding_page_bytes=layout.sliding_page_bytes,
        )
        sliding = any(g.is_sliding for g in self.model_config.layers)
        window = self.model_config.sliding_window - 1 if sliding else 0  # what a hit must restore
        cache = PrefixCache(layout.page_size, window, num_sliding) if config.prefix_caching else None
        whole = config.reference_mode  # generate() encodes a prompt in one pass
        self.scheduler = Scheduler(
            KVBudget(num_pages, config.max_num_seqs, cache),
            self.model_config.canvas_length,
            config.max_num_seqs,
            config.max_waiting,
            prefill_chunk=None if whole else config.prefill_chunk,
            max_batched_tokens=None if whole else config.max_num_batched_tokens,
        )
        self._pending: list[EngineEvent] = []  # produced between steps (aborts)
        long_seqs = num_pages // self.info.kv_pages_for(MIN_CONTEXT, 1)
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

    def add_request(self, request: Request) -> None:
        """Check and queue a request. Raises InvalidRequestError naming the field at fault (ContextLengthError: it can
        never fit), QueueFullError when the waiting queue is full."""
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Check and queue requests together (the choices of one API request): all of them, or, when one is refused,
        none."""
        checked = [(request, request.validate(self.info)) for request in requests]
        self.scheduler.add([(r, p, self.info.kv_pages_for(len(r.prompt_ids), p.max_tokens)) for r, p in checked])

    def abort(self, request_id: str) -> None:
        """Stop a request; it leaves the batch before the next iteration and its memory is reused."""
        if (finished := self.scheduler.abort(request_id)) is not None:
            self._pending.append(finished)

    def fail_running(self, error: str) -> list[Failed]:
        """Fail every running sequence (after a step that raised): their memory is free for the next iteration."""
        return self.scheduler.fail(list(self.scheduler.running), error)

    def has_unfinished(self) -> bool:
        """True while a step has work: sequences to run, or events (aborts) to deliver."""
        return self.scheduler.has_work() or bool(self._pending)

    def step(self) -> tuple[list[EngineEvent], StepStats]:
        """Admit, encode prompts and finished canvases, run one denoising step for every running sequence. An
        out-of-memory error fails only this iteration's sequences, whose memory is freed; the engine goes on."""
        events, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        try:
            output = self.runner.run(batch)
        except torch.OutOfMemoryError as exc:
            events += self._out_of_memory(batch, exc)
            output = StepOutput()
        else:
            events += self.scheduler.postprocess(batch, output)
        return events, self._stats(batch, output, events)

    def _out_of_memory(self, batch: Batch, exc: torch.OutOfMemoryError) -> list[Failed]:
        seqs = list({id(s): s for s in (*batch.admitted, *(c.seq for c in batch.encode), *batch.denoise)}.values())
        logger.error(
            "out of memory in an iteration of %d encode tokens and %d denoising rows; failing its %d requests: %s",
            sum(len(c.token_ids) for c in batch.encode), len(batch.denoise), len(seqs), exc,
        )  # fmt: skip
        if self.config.torch_device.type == "cuda":
            torch.cuda.empty_cache()  # hand the failed iteration's blocks back before the next one
        return self.scheduler.fail(seqs, "out of memory on the device; retry, or lower the load")

    def _stats(self, batch: Batch, output: StepOutput, events: list[EngineEvent]) -> StepStats:
        cache = self.scheduler.cache
        looked_up = batch.admitted if cache else []  # each admission looks its prompt up once
        return StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_encode_tokens=output.num_encoded,
            num_denoise_rows=len(output.rows),
            num_output_tokens=sum(len(e.token_ids) for e in events if isinstance(e, BlockCommitted)),
            encode_s=output.encode_s,
            denoise_s=output.denoise_s,
            kv_pages_used=self.scheduler.budget.num_used,
            prefix_query_tokens=sum(len(seq.request.prompt_ids) for seq in looked_up),
            prefix_hit_tokens=sum(seq.num_cached for seq in looked_up),
            prefix_cached_pages=len(cache.blocks) if cache else 0,
            prefix_evictions=cache.take_evictions() if cache else 0,
        )

    def generate(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[EngineEvent]]:
        """Run requests to completion offline; returns each request's events in order."""
        for request_id, (prompt_ids, params) in requests.items():
            self.add_request(Request(request_id, tuple(prompt_ids), params))
        out: dict[str, list[EngineEvent]] = {request_id: [] for request_id in requests}
        while self.has_unfinished():
            for event in self.step()[0]:
                out[event.request_id].append(event)
        return out
