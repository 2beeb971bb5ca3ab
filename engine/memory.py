"""Will the model fit? Free device memory, the weights' resident bytes in each format, and the check that runs
before any weight is loaded (issue 14)."""

from __future__ import annotations

import os

import torch

from engine.config import EngineConfig
from engine.device import no_cuda_reason
from engine.kv_cache import KVLayout
from models.config import ModelConfig
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
    layout = KVLayout(config, config.canvas_length, torch.empty((), dtype=dtype).element_size())
    return max_num_seqs * layout.slot_bytes + layout.pages_for(context) * layout.page_bytes


class InsufficientMemoryError(RuntimeError):
    """The chosen format's weights plus the minimum KV cache exceed the device's free memory."""


def check_memory(engine_config: EngineConfig, config: ModelConfig, free: int) -> None:
    """Refuse, before any weight is read, a model that cannot fit, naming the formats that would. The KV cache
    counted is the configured budget, else its minimum. On the CPU `free` is MemAvailable and the weights are counted
    at the load dtype (fp32 unless --dtype bfloat16): the real checkpoint in fp32 (about 101 GB) would otherwise be
    OOM-killed, or swap for minutes, before anyone saw why."""
    device = engine_config.torch_device
    if device.type not in ("cuda", "cpu"):
        return
    dtype, checkpoint = engine_config.torch_dtype, engine_config.checkpoint
    kv = engine_config.kv_budget_bytes or min_kv_bytes(config, dtype, engine_config.max_num_seqs)
    plan = checkpoint_plan(checkpoint, engine_config.quantization)
    needed = weight_bytes(config, dtype, plan) + kv
    if needed <= free:
        return
    name = plan.format if plan else str(dtype).removeprefix("torch.")
    where = f"on {device}" if device.type == "cuda" else "in CPU memory"
    message = (
        f"the model does not fit {where}: {name} weights "
        f"{(needed - kv) / GiB:.1f} GiB + KV cache {kv / GiB:.2f} GiB > {free / GiB:.1f} GiB free."
    )
    if device.type == "cpu" and engine_config.device is None:
        message += " The CPU was chosen because no CUDA GPU is usable: " + no_cuda_reason()
    if plan is not None and not plan.from_bf16:
        raise InsufficientMemoryError(f"{message} Use a device with more memory or a smaller checkpoint format.")
    options = {f"--quantization {q}": weight_bytes(config, dtype, checkpoint_plan(checkpoint, q))
               for q in QUANTIZATION_CHOICES if q != engine_config.quantization}  # fmt: skip
    fits = [f"{option} ({size / GiB:.1f} GiB of weights)" for option, size in options.items() if size + kv <= free]
    hint = f" Formats that fit: {', '.join(fits)}." if fits else " No format fits: use a device with more memory."
    raise InsufficientMemoryError(message + hint)
