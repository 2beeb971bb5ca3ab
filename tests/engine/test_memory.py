"""The memory check before loading (issue 14): a model that cannot fit is refused with the formats that would, and
unified-memory GPUs count memory the kernel can reclaim as free. Free memory is simulated."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import engine.engine as engine_module
import engine.memory as memory
from engine.config import EngineConfig
from engine.engine import Engine
from engine.memory import InsufficientMemoryError, check_memory, min_kv_bytes, planned_split, weight_bytes
from models.config import load_config, model_config_from_dict
from models.loader import checkpoint_plan
from models.quant import load_time_plan
from models.random_checkpoint import config_json


def test_refuses_a_model_that_does_not_fit_naming_the_formats_that_would(tiny_checkpoint):
    engine_config = EngineConfig(str(tiny_checkpoint), device="cuda", dtype="bfloat16", max_num_seqs=2)
    config = load_config(tiny_checkpoint)[0]
    kv = min_kv_bytes(config, torch.bfloat16, 2)
    size = {
        q: weight_bytes(config, torch.bfloat16, checkpoint_plan(tiny_checkpoint, q)) for q in (None, "fp8", "nvfp4")
    }
    assert size[None] > max(size["fp8"], size["nvfp4"])
    split = planned_split(engine_config, config, size[None], kv)
    assert split.activations > 0 and split.graphs > 0  # compiled and captured on CUDA
    rest = split.activations + split.graphs + kv  # the same in every format
    check_memory(engine_config, config, split.total)  # fits exactly

    with pytest.raises(InsufficientMemoryError) as refused:
        check_memory(engine_config, config, max(size["fp8"], size["nvfp4"]) + rest)
    assert "bfloat16 weights" in str(refused.value) and "activations" in str(refused.value)
    assert "--quantization fp8" in str(refused.value) and "--quantization nvfp4" in str(refused.value)

    smaller = min(("fp8", "nvfp4"), key=size.get)
    with pytest.raises(InsufficientMemoryError) as refused:
        check_memory(engine_config, config, size[smaller] + rest)
    assert f"--quantization {smaller} (" in str(refused.value)
    assert str(refused.value).count("--quantization") == 1

    with pytest.raises(InsufficientMemoryError, match="Nothing fits"):
        check_memory(engine_config, config, kv)
    with pytest.raises(InsufficientMemoryError, match="does not fit in CPU memory: float32 weights"):
        check_memory(EngineConfig(str(tiny_checkpoint), device="cpu"), config, 0)  # CPUs are checked too


def test_a_refusal_names_the_smaller_settings_that_would_fit(tiny_checkpoint):
    """Fewer rows or one chunk per iteration shrink the activations (and the KV minimum): the refusal says so."""
    engine_config = EngineConfig(str(tiny_checkpoint), device="cuda", dtype="bfloat16", max_num_seqs=8)
    config = load_config(tiny_checkpoint)[0]
    weights = weight_bytes(config, torch.bfloat16, None)
    fewer = replace(engine_config, max_num_seqs=4)
    free = planned_split(fewer, config, weights, min_kv_bytes(config, torch.bfloat16, 4)).total
    with pytest.raises(InsufficientMemoryError, match="Settings that fit: --max-num-seqs 4"):
        check_memory(engine_config, config, free)


def test_the_engine_checks_before_loading(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, too small
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 4096)
    monkeypatch.setattr(engine_module, "load_model", lambda *a, **k: pytest.fail("loaded before the memory check"))
    with pytest.raises(InsufficientMemoryError, match="does not fit on cuda"):
        Engine(EngineConfig(str(tiny_checkpoint), device="cuda"))


@pytest.mark.parametrize("integrated", [True, False], ids=["unified (DGX Spark)", "discrete"])
def test_unified_memory_counts_reclaimable_memory_as_free(monkeypatch, integrated):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(is_integrated=integrated))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 128 * 2**30))  # page cache counted used
    monkeypatch.setattr(memory, "_mem_available", lambda: 100 * 2**30)
    expected = 100 * 2**30 if integrated else 3 * 2**30
    assert memory.free_memory_bytes(torch.device("cuda", 0)) == expected


def real_config():
    cfg = config_json("structure")
    cfg["text_config"].update(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704)
    return model_config_from_dict(cfg)


def test_resident_weight_bytes_of_the_real_model():
    """bf16: spec 1.4's 25,250,986,752 text parameters at 2 bytes (+ 60 layer scalars); fp8 about half."""
    config = real_config()
    bf16 = weight_bytes(config, torch.bfloat16, None)
    assert bf16 == 2 * 25_250_986_752 + 2 * 60
    fp8 = weight_bytes(config, torch.bfloat16, load_time_plan("fp8"))
    nvfp4 = weight_bytes(config, torch.bfloat16, load_time_plan("nvfp4"))
    assert 26.0e9 < fp8 < 27.5e9 and 16.0e9 < nvfp4 < 18.0e9
