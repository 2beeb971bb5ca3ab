"""Quantized formats (issue 14): resident weight bytes of the real model per format, which cards each fits with how
much KV cache left at 8K context, and load time and CPU tokens/s of each format on the bench checkpoint.

python -m benchmarks.bench_quant            # ~10 min on 2 busy cores
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVLayout
from engine.memory import GiB, weight_bytes
from engine.request import SamplingParams
from models.config import model_config_from_dict
from models.quant import load_time_plan, plan_from_config
from models.quantized_checkpoint import FORMATS, quantization_config, write_quantized_checkpoint
from models.random_checkpoint import config_json, write_random_checkpoint

CARDS = (24, 32, 48, 80, 96, 128, 141)  # GB as the cards are sold (~GiB); 1 GiB each is left to CUDA's context
CONTEXT = 8192


def real_config() -> dict:
    cfg = config_json("structure")
    cfg["text_config"].update(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704)
    return cfg


def memory_table() -> None:
    cfg = real_config()
    config = model_config_from_dict(cfg)
    plans = {"bf16": None, "fp8 (RedHat FP8-dynamic = --quantization fp8)": load_time_plan("fp8"),
             "nvfp4 experts only (NVIDIA ModelOpt = --quantization nvfp4)": load_time_plan("nvfp4"),
             "nvfp4 experts + dense MLP (RedHat NVFP4)": plan_from_config(
                 {"quantization_config": quantization_config("nvfp4-ct", cfg["text_config"])})}  # fmt: skip
    layout = KVLayout(config, config.canvas_length, 2)
    per_sequence = layout.slot_bytes + layout.pages_for(CONTEXT) * layout.page_bytes
    print(f"KV cache per sequence at {CONTEXT} tokens (bf16): {per_sequence / GiB:.2f} GiB")
    print("| format | weights GiB (GB) | " + " | ".join(f"{c} GB" for c in CARDS) + " |")
    for name, plan in plans.items():
        weights = weight_bytes(config, torch.bfloat16, plan)
        cells = []
        for card in CARDS:
            left = (card - 1) * GiB - weights
            cells.append(f"{left / GiB:.0f} GiB KV, {int(left // per_sequence)} seqs" if left >= per_sequence else "no")
        print(f"| {name} | {weights / GiB:.1f} ({weights / 1e9:.1f}) | " + " | ".join(cells) + " |")


def speed_table() -> None:
    root = Path(tempfile.mkdtemp())
    bf16 = write_random_checkpoint(root / "bf16", "bench", dtype=torch.bfloat16)
    runs = {"bf16": (bf16, None), "bf16 --quantization fp8": (bf16, "fp8"),
            "bf16 --quantization nvfp4": (bf16, "nvfp4")}  # fmt: skip
    for fmt in FORMATS:
        runs[fmt] = (write_quantized_checkpoint(root / fmt, fmt, "bench"), None)
    params = SamplingParams(max_tokens=256, steps=4, seed=0, stop_token_ids=())
    print("| checkpoint | load s | CPU tok/s (fp32, 256 tokens, 4 steps) |")
    for name, (path, quantization) in runs.items():
        started = time.perf_counter()
        engine = Engine(EngineConfig(str(path), device="cpu", quantization=quantization, kv_budget_bytes=256 * 2**20,
                                     max_num_seqs=1))  # fmt: skip
        loaded = time.perf_counter() - started
        engine.generate({"warmup": ([2, 105, 9], SamplingParams(max_tokens=8, steps=2, seed=0))})
        started = time.perf_counter()
        engine.generate({"r": ([2, 105, 9, 44, 301], params)})
        print(f"| {name} | {loaded:.2f} | {256 / (time.perf_counter() - started):.1f} |")


if __name__ == "__main__":
    memory_table()
    speed_table()
