"""Will the model fit? Free device memory, the weights' resident bytes in each format, and the check that runs
before any weight is loaded (issue 14); the split of a device's memory into weights, activations, CUDA graphs and KV,
with the activation formula (ActivationModel) and the live-bytes tracker that checks it (LiveBytes) (issue 23)."""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.config import EngineConfig
from engine.device import no_cuda_reason
from engine.kv_cache import KVLayout, page_bucket
from models.config import LayerGeometry, ModelConfig
from models.loader import build_model, checkpoint_plan
from models.quant import QUANTIZATION_CHOICES, QuantPlan

MIN_CONTEXT = 8192  # the minimum KV budget: every slot's sliding window plus one sequence of this many tokens
GiB = 2**30


def _mem_available() -> int:
    """MemAvailable: free pages plus reclaimable ones (the page cache of memory-mapped weights among them)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes(device: torch.device) -> int:
    """Memory available for weights and KV cache now. On unified-memory GPUs (DGX Spark's GB10, Jetson) device
    memory is system memory, and mem_get_info counts the page cache of the memory-mapped checkpoint as used, though
    the kernel hands it back on demand: there MemAvailable is the truth, as on CPU."""
    if device.type == "cuda" and not torch.cuda.get_device_properties(device).is_integrated:
        return torch.cuda.mem_get_info(device)[0]
    return _mem_available()


def weight_bytes(config: ModelConfig, dtype: torch.dtype, plan: QuantPlan | None) -> int:
    """Resident bytes of the weights and buffers in this format, from the shapes (a meta-device model)."""
    model = build_model(config, dtype, plan)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def min_kv_bytes(config: ModelConfig, dtype: torch.dtype, max_num_seqs: int, context: int = MIN_CONTEXT) -> int:
    layout = KVLayout.of(config, dtype)
    return max_num_seqs * layout.slot_bytes + layout.pages_for(context) * layout.page_bytes


class InsufficientMemoryError(RuntimeError):
    """The chosen format's weights, activations, CUDA graphs and minimum KV cache exceed the device's free memory."""


@dataclass(frozen=True, slots=True)
class MemorySplit:
    """Where a device's memory goes, in bytes: what start-up logs and check_memory refuses by."""

    weights: int
    activations: int  # the peak of the largest step or encode batch the scheduler can form
    graphs: int  # the CUDA graphs' private pool: the captured step's workspace (0 without graphs)
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.graphs + self.kv

    def __str__(self) -> str:
        parts = {"weights": self.weights, "activations": self.activations, "graphs": self.graphs, "KV": self.kv}
        return " + ".join(f"{name} {_size(size)}" for name, size in parts.items() if size or name == "weights")


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def activation_model(engine_config: EngineConfig, config: ModelConfig, w8a8: bool = False) -> ActivationModel:
    """The formula for this engine: every GPU format runs a grouped GEMM whose groups are padded to its kernel's
    block of up to 64 rows (models.gemm_path); the CPU's are padded to 4 (batch invariance). `w8a8`: fp8 experts
    multiply fp8 activations (sm89 and newer)."""
    gpu = engine_config.torch_device.type == "cuda"
    return ActivationModel(
        config,
        "grouped",
        64 if gpu else 4,
        engine_config.sampler_chunk,
        element_size=torch.empty((), dtype=engine_config.torch_dtype).element_size(),
        device=engine_config.torch_device.type,
        w8a8=w8a8,
        query_align=engine_config.batch_alignment,
        key_block=engine_config.encoder_key_block,
    )


def largest_encode(engine_config: EngineConfig) -> list[int]:
    """The chunks of the largest encode batch the scheduler forms: whole prefill chunks up to the token bound (in
    reference mode, one whole prompt)."""
    if engine_config.reference_mode:
        return [engine_config.max_model_len or engine_config.max_capture_len]
    chunk = engine_config.prefill_chunk
    return [chunk] * min(engine_config.max_num_seqs, engine_config.max_num_batched_tokens // chunk)


def planned_split(
    engine_config: EngineConfig, config: ModelConfig, weights: int, kv: int, w8a8: bool = False
) -> MemorySplit:
    """The split the formula predicts: the largest step is max_num_seqs rows at the longest context (every row's
    keys are gathered to the longest row's width), and the CUDA graphs hold the workspace of the largest captured
    step (graphs are captured up to max_capture_len; the shared pool serves the smaller ones)."""
    context = engine_config.max_model_len or config.max_position_embeddings
    formula, rows = activation_model(engine_config, config, w8a8), engine_config.max_num_seqs
    activations = max(formula.step(rows, context), formula.encode(largest_encode(engine_config)))
    captured = engine_config.compiled and engine_config.cuda_graphs and engine_config.torch_device.type == "cuda"
    graphs = formula.step(rows, min(context, engine_config.max_capture_len)) if captured else 0
    return MemorySplit(weights, activations, graphs, kv)


def check_memory(engine_config: EngineConfig, config: ModelConfig, free: int) -> None:
    """Refuse, before any weight is read, a model that cannot fit, naming the settings and formats that would. On a
    GPU the whole split counts (the KV cache at the configured budget, else its minimum). On the CPU `free` is
    MemAvailable and the weights at the load dtype (fp32 unless --dtype bfloat16) plus the minimum KV count: the real
    checkpoint in fp32 (about 101 GB) would otherwise be OOM-killed, or swap for minutes, before anyone saw why."""
    device = engine_config.torch_device
    if device.type not in ("cuda", "cpu"):
        return
    dtype, checkpoint = engine_config.torch_dtype, engine_config.checkpoint
    plan = checkpoint_plan(checkpoint, engine_config.quantization)
    weights = weight_bytes(config, dtype, plan)

    def split(settings: EngineConfig, weights: int = weights) -> MemorySplit:
        min_kv = min_kv_bytes(config, dtype, settings.max_num_seqs)
        if device.type == "cpu":  # CPU pages are committed as they are touched: a budget or a peak is no allocation
            return MemorySplit(weights, 0, 0, min_kv)
        # fp8 on a GPU: counted as W8A8 (sm89 and newer), whose activations are the larger
        w8a8 = plan is not None and plan.scheme == "fp8"
        return planned_split(settings, config, weights, settings.kv_budget_bytes or min_kv, w8a8)

    needed = split(engine_config)
    if needed.total <= free:
        return
    name = plan.format if plan else str(dtype).removeprefix("torch.")
    where = f"on {device}" if device.type == "cuda" else "in CPU memory"
    message = f"the model does not fit {where}: {name} {needed} = {_size(needed.total)} > {_size(free)} free."
    if device.type == "cpu" and engine_config.device is None:
        message += " The CPU was chosen because no CUDA GPU is usable: " + no_cuda_reason()
    fits = [option for option, settings in _smaller_settings(engine_config, config) if split(settings).total <= free]
    if plan is None or plan.from_bf16:
        options = {f"--quantization {q}": weight_bytes(config, dtype, checkpoint_plan(checkpoint, q))
                   for q in QUANTIZATION_CHOICES if q != engine_config.quantization}  # fmt: skip
        fits += [f"{option} ({size / GiB:.1f} GiB of weights)" for option, size in options.items()
                 if split(engine_config, size).total <= free]  # fmt: skip
    hint = f" Settings that fit: {', '.join(fits)}." if fits else " Nothing fits: use a device with more memory."
    raise InsufficientMemoryError(message + hint)


def _smaller_settings(engine_config: EngineConfig, config: ModelConfig) -> list[tuple[str, EngineConfig]]:
    """One smaller setting per knob of the activations and the KV minimum: fewer rows, one chunk per iteration, a
    smaller chunk, a shorter context (where it is not already that small)."""
    out = []
    if engine_config.max_num_seqs > 1:
        rows = engine_config.max_num_seqs // 2
        out.append((f"--max-num-seqs {rows}", replace(engine_config, max_num_seqs=rows)))
    chunk = engine_config.prefill_chunk
    if engine_config.max_num_batched_tokens > chunk:
        out.append((f"--max-num-batched-tokens {chunk}", replace(engine_config, max_num_batched_tokens=chunk)))
    if chunk > 512:
        out.append(("--prefill-chunk 512 --max-num-batched-tokens 512",
                    replace(engine_config, prefill_chunk=512, max_num_batched_tokens=512)))  # fmt: skip
    if (engine_config.max_model_len or config.max_position_embeddings) > 32768:
        out.append(("--max-model-len 32768", replace(engine_config, max_model_len=32768)))
    return out


# --- Activation memory (issue 23): what one iteration allocates beyond the weights and the KV pool. ---------------

ExpertPath = Literal["grouped", "every_expert"]


@dataclass(frozen=True, slots=True)
class ActivationModel:
    """Peak bytes of live activations of the engine's two passes, a formula over the model's shapes.

    Each pass peaks in one of its phases, while the residual stream and its siblings (about RESIDUALS rows of [T, H]
    in the activation dtype) stay live: the attention of a full or a sliding layer, the MoE block, or (denoising)
    the streaming sampler. `fused_attention`: SDPA runs a fused kernel (CUDA), which never holds the [queries, keys]
    scores that the math path (meta, and what the tracker measures there) holds in fp32 with their masked copy.
    Checked against LiveBytes at the real shapes on the meta device (tests/engine/test_activation_memory.py)."""

    config: ModelConfig
    expert_path: ExpertPath = "grouped"
    row_alignment: int = 4  # Experts.row_alignment: every group padded to a multiple of this many rows
    vocab_chunk: int = 8192
    fused_attention: bool = True
    element_size: int = 2  # the activation dtype's
    device: str = "cuda"  # the device type: the CPU's sampler copies chunks of the embedding to fp32
    w8a8: bool = False  # fp8 experts times fp8 activations: the row buffer is quantized per row before each GEMM
    # The encoder's layout (engine/attention.py): queries padded to a multiple of query_align, keys to key_block.
    query_align: int = 1
    key_block: int = 1

    RESIDUALS = 6

    def step(self, rows: int, context: int) -> int:
        """One denoising step of `rows` canvases whose longest row has `context` committed tokens."""
        c, cfg = self.config.canvas_length, self.config
        tokens = rows * c
        width = page_bucket(math.ceil((context + c) / c)) * c  # the page table's keys, as the step pads them
        attention = max(
            self._attention(g, rows, c, cfg.sliding_window - 1 + c if g.is_sliding else width, not self.fused_attention)
            for g in cfg.layers
        )
        chunk = min(self.vocab_chunk, cfg.vocab_size)
        # Three fp32 [N, chunk] workspaces and the fp32 SC accumulator; below fp32 also the LM head's output chunk
        # and, on CPU, the fp32 copy of the embedding chunk that the SC product reads (not both at once).
        sampler = 3 * tokens * chunk * 4 + tokens * cfg.hidden_size * 4
        if self.element_size < 4:
            sampler += max(tokens * chunk * self.element_size, chunk * cfg.hidden_size * 4 * (self.device == "cpu"))
        return self._residual(tokens) + max(attention, self._moe(tokens), sampler)

    def encode(self, chunks: list[int], context: int = 0) -> int:
        """One encoder pass over chunks of these many tokens, each after `context` committed tokens. The encoder
        runs in inference mode, where SDPA is one fused op on every device."""
        tokens = -(-sum(chunks) // 4) * 4  # ModelRunner pads the flattened batch to TOKEN_ALIGNMENT
        cfg, kb, s = self.config, self.key_block, self.element_size
        out = tokens * cfg.num_attention_heads * max(g.head_dim for g in cfg.layers) * s
        low = max(0, context - (cfg.sliding_window - 1))
        spans = {}  # chunk -> its padded queries and its full and sliding layers' keys
        for n in set(chunks):
            rows = -(-n // self.query_align) * self.query_align
            last = -(-(context + rows) // kb) * kb
            spans[n] = rows, last, last - low // kb * kb
        # A sliding layer's keys and values are copied (held ones and new ones together), and masked SDPA repeats
        # every layer's per query head (models/attend.py).
        attention = max(
            self._attention(g, 1, rows, keys)
            + 2 * keys * g.head_dim * s * ((g.num_kv_heads if g.is_sliding else 0) + cfg.num_attention_heads)
            for g in cfg.layers
            for rows, full, sliding in spans.values()
            for keys in [sliding if g.is_sliding else full]
        )
        # Every sequence's causal masks (bool [n, keys] for a full and a sliding layer) are built before the pass.
        masks = sum(spans[n][0] * (spans[n][1] + spans[n][2]) for n in chunks)
        return self._residual(tokens) + masks + max(out + attention, self._moe(tokens))

    def _residual(self, tokens: int) -> int:
        return self.RESIDUALS * tokens * self.config.hidden_size * self.element_size

    def _moe(self, tokens: int) -> int:
        cfg, s = self.config, self.element_size
        h, i, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts
        if self.expert_path == "every_expert":  # [E, T, 2I] gate/up, [E, T, I] hidden, [E, T, H] out
            return e * tokens * (3 * i + h) * s
        rows = tokens * k + e * (self.row_alignment - 1)
        # the row buffer and its output [R, H], gate/up [R, 2I], hidden [R, I]; the pairs' outputs [T*K, H]; the sort
        grouped = rows * (2 * h + 3 * i) * s + tokens * k * (h * s + 32)
        if not self.w8a8:
            return grouped
        # models.quant.quantize_rows of the row buffer: its fp32 copy and the fp32 quotient, beside the buffer
        return max(grouped, rows * h * (s + 8) + tokens * k * 32)

    def _attention(self, g: LayerGeometry, rows: int, queries: int, keys: int, math_path: bool = False) -> int:
        """One layer's attention: q/k/v projections and their normed, rotated copies, the gathered keys of a full
        layer, and (math path) fp32 copies of q, k and v and the scores with their masked copy."""
        s, heads, d, kv_heads = self.element_size, self.config.num_attention_heads, g.head_dim, g.num_kv_heads
        projections = 2 * rows * queries * (heads + kv_heads) * d * s
        gathered = 0 if g.is_sliding else 2 * rows * kv_heads * keys * d * s
        if not math_path:
            return projections + gathered
        math_path = 2 * rows * heads * queries * d * 4 + 2 * rows * kv_heads * keys * d * 4
        return projections + gathered + math_path + 2 * rows * heads * queries * keys * 4


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops allocate while it is active (inputs made before it, and views
    or in-place results of them, are not counted): the activation peak of a pass on any device, meta included."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self._held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._held or key in inputs:
                continue
            self._held.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._held.discard(key)
        self.live -= nbytes
