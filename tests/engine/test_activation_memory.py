"""The activation formula (engine.memory.ActivationModel) against the live-bytes tracker (issue 23): at the real
model's shapes on the meta device, one denoising step at B = 1/8/16 and the largest encode batch for both expert
paths (meta runs the decoder's SDPA on its math path, so the step's formula is taken with fused_attention off); and
the engine's own profiling pass on the CPU at tiny widths, in both dtypes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVLayout, page_bucket
from engine.memory import ActivationModel, LiveBytes, activation_model
from engine.model_runner import ModelRunner, measure_activations
from engine.request import Request, SamplingParams
from engine.scheduler import Chunk
from engine.sequence import Sequence
from models.diffusion_gemma import Experts
from models.gemm_path import ExpertPath
from models.loader import build_model, choose_kernels
from models.quant import load_time_plan
from tests.engine.test_memory import real_config

ALIGNMENT, VOCAB_CHUNK, CHUNK = 4, 8192, 2048


# The experts' kernels as each card class runs them (models.gemm_path), by weight format: torch's grouped_mm (sm90,
# the CPU), the Triton grouped GEMM (other GPUs: bf16, fp8 x fp8 on sm89, nvfp4), torch's fp8 grouped GEMM (sm90), and
# every expert on every token (no grouped GEMM at all).
PATHS = {
    "grouped_mm": (None, "sm90"),
    "triton": (None, "sm86"),
    "fp8_w8a8-triton": ("fp8", "sm89"),
    "fp8_w8a8-torch": ("fp8", "sm90"),
    "nvfp4-triton": ("nvfp4", "sm120"),
    "every_expert": (None, None),
}


@pytest.fixture(scope="module", params=list(PATHS))
def runner(request):
    """A ModelRunner over the real-shaped model on meta (bf16, or quantized at load), its kernels those of a card."""
    config = real_config()
    scheme, device_class = PATHS[request.param]
    model = build_model(config, torch.bfloat16, load_time_plan(scheme) if scheme else None, ALIGNMENT)
    choose_kernels(model, torch.device("meta"), torch.bfloat16, device_class)
    if device_class is None:
        for module in model.modules():
            if isinstance(module, Experts):
                module.set_path(ExpertPath("every_expert", "dense"))
    engine_config = EngineConfig("meta", device="meta", dtype="bfloat16", max_num_seqs=16, vocab_chunk=VOCAB_CHUNK)
    num_pages, _ = KVLayout.of(config, torch.bfloat16).split(9 * 2**30, engine_config.max_num_seqs)
    return model.layers[0].experts, ModelRunner(model, config, engine_config, num_pages, config.max_position_embeddings)


def formula(runner, fused_attention: bool = True) -> ActivationModel:
    experts, r = runner
    path = "every_expert" if experts.path.kernel == "every_expert" else "grouped"
    w8a8 = experts.path.weights == "fp8_w8a8"
    return ActivationModel(r.config, path, experts.row_alignment, VOCAB_CHUNK, fused_attention, w8a8=w8a8)


@pytest.mark.parametrize(("rows", "context"), [(1, 0), (8, 0), (16, 0), (8, 8192)])
def test_a_denoising_step_peaks_where_the_formula_says(runner, rows, context):
    r = runner[1]
    inputs = r.step_inputs([None] * rows, page_bucket(r.layout.pages_for(context + r.config.canvas_length)))
    tracker = LiveBytes()
    with tracker, torch.no_grad():
        r.step({name: x.to("meta") for name, x in inputs.items()}, self_condition=True, scaled_proposals=True)
    expected = formula(runner, fused_attention=False).step(rows, context)
    assert tracker.peak == pytest.approx(expected, rel=0.05)


def test_the_largest_encode_batch_peaks_where_the_formula_says(runner):
    """Four prompts' 2048-token chunks (the default --max-num-batched-tokens), the second chunk of each."""
    r = runner[1]
    chunks, pages = [], r.layout.pages_for(3 * CHUNK)
    for i in range(4):
        seq = Sequence(Request(str(i), (1,) * 2 * CHUNK), SamplingParams(), 0, pages, r.config.canvas_length)
        seq.slot, seq.pages = i, list(range(1 + i * pages, 1 + (i + 1) * pages))
        chunks.append(Chunk(seq, CHUNK, [1] * CHUNK))
    r.admit([chunk.seq for chunk in chunks])
    tracker = LiveBytes()
    with tracker:
        r.encode(chunks)
    assert tracker.peak == pytest.approx(formula(runner).encode([CHUNK] * 4, CHUNK), rel=0.05)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_profiling_pass_measures_what_the_formula_says_at_tiny_widths(tiny_checkpoint, dtype):
    """measure_activations, which sizes the KV pool on CUDA, here through LiveBytes."""
    engine = Engine(EngineConfig(str(tiny_checkpoint), dtype=dtype, kv_budget_bytes=64 * 2**20))
    for rows, context, chunks in ((1, 64, [64]), (8, 1024, [128] * 4)):
        config = replace(engine.config, max_num_seqs=rows)
        formula = activation_model(config, engine.model_config)
        expected = max(formula.step(rows, context), formula.encode(chunks))
        peak = measure_activations(engine.model, engine.model_config, config, context, chunks)
        assert peak == pytest.approx(expected, rel=0.05)
