"""The GEMM each device class, dtype and format gets (models.gemm_path, issue 22): one grouped GEMM per projection
everywhere, torch's kernels where they are the fast ones, Triton elsewhere; chosen once at load and logged."""

from __future__ import annotations

import logging

import pytest
import torch

import models.gemm_path as gp
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from models import moe_triton
from models.config import ConfigError
from models.gemm_path import ExpertPath, expert_path, linear_path
from tests.engine.test_engine import assert_same_tokens, output_tokens

BF16, FP32 = torch.bfloat16, torch.float32
CUDA = torch.device("cuda", 0)

# device class -> (kernel, weights) for: bf16 model, fp32 model, fp8 bf16, fp8 fp32, nvfp4 bf16
TABLE = {
    "sm80": (("triton", "dense"), ("triton", "dense"), ("triton", "fp8"), ("triton", "fp8"), ("triton", "nvfp4")),
    "sm86": (("triton", "dense"), ("triton", "dense"), ("triton", "fp8"), ("triton", "fp8"), ("triton", "nvfp4")),
    "sm89": (("triton", "dense"), ("triton", "dense"), ("triton", "fp8_w8a8"), ("triton", "fp8_w8a8"),
             ("triton", "nvfp4")),
    "sm90": (("grouped_mm", "dense"), ("triton", "dense"), ("scaled_grouped_mm", "fp8_w8a8"), ("triton", "fp8_w8a8"),
             ("triton", "nvfp4")),
    "sm100": (("grouped_mm", "dense"), ("triton", "dense"), ("scaled_grouped_mm", "fp8_w8a8"),
              ("triton", "fp8_w8a8"), ("triton", "nvfp4")),
    "sm120": (("triton", "dense"), ("triton", "dense"), ("triton", "fp8_w8a8"), ("triton", "fp8_w8a8"),
              ("triton", "nvfp4")),
    "sm121": (("triton", "dense"), ("triton", "dense"), ("triton", "fp8_w8a8"), ("triton", "fp8_w8a8"),
              ("triton", "nvfp4")),
}  # fmt: skip
CASES = ((None, BF16), (None, FP32), ("fp8", BF16), ("fp8", FP32), ("nvfp4", BF16))


def _kernel(path: ExpertPath) -> tuple[str, str]:
    return path.kernel, path.weights


@pytest.mark.parametrize("device_class", TABLE)
def test_each_device_class_gets_one_grouped_gemm(monkeypatch, device_class):
    """Forced on the meta device and, read from the device itself, on a CUDA device: the same choice."""
    monkeypatch.setattr(moe_triton, "available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gp.DEVICE_CLASSES[device_class])
    for (scheme, dtype), expected in zip(CASES, TABLE[device_class], strict=True):
        forced = expert_path(torch.device("meta"), dtype, scheme, device_class)
        assert _kernel(forced) == expected, (scheme, dtype)
        assert _kernel(expert_path(CUDA, dtype, scheme)) == expected
        assert (forced.launch is not None) == (forced.kernel == "triton")
        assert "every_expert" not in str(forced)


@pytest.mark.parametrize("device_class", TABLE)
def test_fp8_linears_run_w8a8_from_sm89(device_class):
    w8a8 = gp.DEVICE_CLASSES[device_class] >= (8, 9)
    assert linear_path(torch.device("meta"), "fp8", device_class) == ("w8a8" if w8a8 else "dequantize")
    assert linear_path(torch.device("meta"), "nvfp4", device_class) == "dequantize"


def test_the_cpu_runs_torch_grouped_mm_on_exactly_dequantised_weights():
    for scheme, dtype in CASES:
        for device, device_class in ((torch.device("cpu"), None), (torch.device("meta"), None), (CUDA, "cpu")):
            assert _kernel(expert_path(device, dtype, scheme, device_class)) == ("grouped_mm", "dense")
        assert linear_path(torch.device("cpu"), scheme or "fp8") == "dequantize"


def test_without_a_grouped_gemm(monkeypatch):
    """torch < 2.10 on CPU: every expert on every token; a GPU without triton: bf16 likewise, quantized refused."""
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    assert _kernel(expert_path(torch.device("cpu"), FP32, "nvfp4")) == ("every_expert", "dense")
    monkeypatch.setattr(moe_triton, "available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert _kernel(expert_path(CUDA, BF16, None)) == ("every_expert", "dense")
    with pytest.raises(ConfigError, match="triton"):
        expert_path(CUDA, BF16, "nvfp4")
    monkeypatch.setattr(moe_triton, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: no bf16 MMA
    assert _kernel(expert_path(CUDA, BF16, None)) == ("every_expert", "dense")


def test_rocm_runs_triton_without_nvidia_kernels(monkeypatch):
    monkeypatch.setattr(moe_triton, "available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))  # MI300 reports 9.4
    assert _kernel(expert_path(CUDA, BF16, None)) == ("triton", "dense")
    assert _kernel(expert_path(CUDA, BF16, "fp8")) == ("triton", "fp8")
    assert linear_path(CUDA, "fp8") == "dequantize"


def test_an_unknown_device_class_is_refused():
    with pytest.raises(ConfigError, match="sm75"):
        expert_path(torch.device("meta"), BF16, None, "sm75")


def test_triton_tiles_set_the_row_alignment():
    path = expert_path(torch.device("meta"), BF16, "nvfp4", "sm120")
    block_m = path.launch.block_m
    assert path.row_alignment(1) == block_m and path.row_alignment(4) % 4 == 0 and path.row_alignment(4) >= block_m
    assert ExpertPath("grouped_mm", "dense").row_alignment(4) == 4


def test_the_choice_is_made_at_load_and_logged(tiny_checkpoint, caplog):
    from models.loader import load_model

    with caplog.at_level(logging.INFO, logger="models.loader"):
        model, _, _ = load_model(tiny_checkpoint, BF16, "meta", progress=False, device_class="sm89", quantization="fp8")
    assert "experts: triton fp8 w8a8 grouped GEMM" in caplog.text
    assert "quantized linears: w8a8 fp8" in caplog.text
    paths = {_kernel(layer.experts.path) for layer in model.layers}
    assert paths == {("triton", "fp8_w8a8")}
    assert {layer.experts.row_alignment for layer in model.layers} == {model.layers[0].experts.path.launch.block_m}


def test_the_triton_bf16_path_gives_the_cpu_paths_tokens(tiny_checkpoint):
    """Unquantized weights through the Triton kernel (its interpreter, as an A100 runs it) in reference mode, in fp32:
    the same tokens. (In bf16 the interpreter rounds by truncation where GPUs round to nearest, so random weights'
    tokens drift; the kernel tests bound bf16 to one ulp.)"""
    tokens = []
    for device_class in (None, "sm80"):
        engine = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=2**26, reference_mode=True, max_num_seqs=1,
                                     device_class=device_class))  # fmt: skip
        assert engine.model.layers[0].experts.path.kernel == ("triton" if device_class else "grouped_mm")
        params = SamplingParams(max_tokens=32, seed=3, steps=2)
        tokens.append(output_tokens(engine.generate({"r": ([2, 105, 31, 7, 99], params)})["r"]))
    assert len(tokens[0]) == 32
    assert_same_tokens(tokens[1], tokens[0], "triton vs torch grouped_mm")
