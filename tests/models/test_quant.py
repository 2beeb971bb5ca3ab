"""Quantized checkpoints (issue 14): the three published formats load and reproduce their dequantised bf16 twins
(logits bit for bit, reference-mode tokens), compressed-tensors agrees with our dequantisation, bad files fail at
load naming the tensor or field, load-time quantization, and the compute path each GPU gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import FloatQuantizationCompressor, NVFP4PackedCompressor
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file, save_file

import models.quant as quant
from benchmarks.step_ops import OpCounter, count_step, denoising_engine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from models.config import ConfigError, model_config_from_dict
from models.diffusion_gemma import Experts
from models.gemm_path import expert_path
from models.loader import CheckpointError, load_model
from models.quantized_checkpoint import FORMATS, write_quantized_checkpoint
from models.random_checkpoint import config_json
from tests.engine.test_engine import assert_same_tokens, output_tokens
from tests.models.test_parity import make_case, our_logits

MiB = 2**20


@pytest.fixture(scope="module", params=FORMATS)
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(format, quantized checkpoint, its dequantised bf16 twin) of the tiny size."""
    root = tmp_path_factory.mktemp(request.param)
    fmt = request.param
    return fmt, write_quantized_checkpoint(root / "q", fmt, "tiny", seed=3, twin=root / "twin"), root / "twin"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quantized_logits_equal_the_dequantised_twins(pair, dtype):
    _, checkpoint, twin = pair
    ours, config, _ = load_model(checkpoint, dtype, progress=False)
    dense, _, _ = load_model(twin, dtype, progress=False)
    assert isinstance(ours.layers[0].experts, quant.QuantExperts)
    case = make_case([6, 25], 1, config.canvas_length, seed=5)
    logits = our_logits(ours, config, case, None)
    assert torch.equal(logits, our_logits(dense, config, case, None))
    # and the quantization is real: the twin differs from the bf16 weights it was made from
    assert logits.abs().max() > 0


def test_files_hold_the_published_names_dtypes_and_shapes(pair):
    fmt, checkpoint, _ = pair
    tensors = load_file(checkpoint / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    expert = "model.decoder.layers.0.experts.7."
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in tensors)  # split per expert
    if fmt == "fp8":
        assert tensors[expert + "gate_proj.weight"].dtype == torch.float8_e4m3fn
        assert tensors[expert + "down_proj.weight_scale"].shape == (h, 1)
        assert tensors[expert + "down_proj.weight_scale"].dtype == torch.bfloat16
        assert tensors["model.decoder.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        assert tensors["model.decoder.layers.0.router.proj.weight"].dtype == torch.bfloat16
        assert tensors["model.decoder.self_conditioning.up_proj.weight"].dtype == torch.bfloat16
        return
    packed = "weight" if fmt == "nvfp4-modelopt" else "weight_packed"
    assert tensors[f"{expert}up_proj.{packed}"].dtype == torch.uint8
    assert tensors[f"{expert}up_proj.{packed}"].shape == (i, h // 2)
    assert tensors[f"{expert}down_proj.weight_scale"].shape == (h, i // 16)
    assert tensors[f"{expert}down_proj.weight_scale"].dtype == torch.float8_e4m3fn
    second = tensors[f"{expert}down_proj." + ("weight_scale_2" if fmt == "nvfp4-modelopt" else "weight_global_scale")]
    assert second.dtype == torch.float32 and second.shape == (() if fmt == "nvfp4-modelopt" else (1,))
    assert tensors["model.decoder.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    mlp = tensors["model.decoder.layers.0.mlp.up_proj." + ("weight" if fmt == "nvfp4-modelopt" else packed)]
    assert mlp.dtype == (torch.bfloat16 if fmt == "nvfp4-modelopt" else torch.uint8)  # CT also packs the dense MLP
    if fmt == "nvfp4-modelopt":
        assert json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"


def _oracle(fmt: str, config: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A module's weight as compressed-tensors dequantises it (ModelOpt's form through its converter)."""
    qc = config["quantization_config"]
    if fmt == "nvfp4-modelopt":
        local = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
        tensors = ModelOptNvfp4Converter(ignore=qc["ignore"], targets=["re:.*experts.*"]).process(local)
    group = qc["config_groups"]["group_0"] if fmt != "nvfp4-modelopt" else None
    scheme = (
        QuantizationScheme(targets=["Linear"], weights=group["weights"])
        if group
        else QuantizationScheme(targets=["Linear"], weights={"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                             "group_size": 16, "symmetric": True})
    )  # fmt: skip
    state = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
    compressor = FloatQuantizationCompressor if fmt == "fp8" else NVFP4PackedCompressor
    return compressor.decompress(state, scheme)["weight"]


def test_compressed_tensors_dequantises_as_we_do(pair):
    fmt, checkpoint, twin = pair
    config = json.loads((checkpoint / "config.json").read_text())
    tensors, dense = load_file(checkpoint / "model.safetensors"), load_file(twin / "model.safetensors")
    i = config["text_config"]["moe_intermediate_size"]
    for layer in (0, 3):
        prefix = f"model.decoder.layers.{layer}.experts"
        for e in (0, 5):
            for proj, expected in (("gate", dense[f"{prefix}.gate_up_proj"][e, :i]),
                                   ("up", dense[f"{prefix}.gate_up_proj"][e, i:]),
                                   ("down", dense[f"{prefix}.down_proj"][e])):  # fmt: skip
                oracle = _oracle(fmt, config, f"{prefix}.{e}.{proj}_proj", tensors).to(torch.bfloat16)
                if fmt == "nvfp4-modelopt":  # the converter stores 1 / weight_scale_2: one rounding apart
                    torch.testing.assert_close(oracle, expected, rtol=2**-7, atol=0)
                else:
                    assert torch.equal(oracle, expected), f"{prefix}.{e}.{proj}_proj"
    if fmt != "nvfp4-modelopt":
        module = "model.decoder.layers.1.mlp.down_proj"
        assert torch.equal(_oracle(fmt, config, module, tensors).to(torch.bfloat16), dense[module + ".weight"])


def reference_mode_tokens(checkpoint: Path, device_class: str | None = None, **params) -> list[int]:
    engine = Engine(EngineConfig(str(checkpoint), kv_budget_bytes=64 * MiB, reference_mode=True, max_num_seqs=1,
                                 device_class=device_class))  # fmt: skip
    sampling = SamplingParams(max_tokens=64, seed=1, **params)
    return output_tokens(engine.generate({"r": ([2, 105, 9, 44, 301, 17], sampling)})["r"])


# None: the CPU's exact path; sm86: the Triton grouped GEMM (weight-only fp8, nvfp4) through Triton's interpreter.
@pytest.mark.parametrize("device_class", [None, "sm86"])
def test_reference_mode_tokens_equal_the_twins(pair, device_class):
    _, checkpoint, twin = pair
    steps = {"steps": 2} if device_class else {}  # the interpreter is slow
    tokens = reference_mode_tokens(checkpoint, device_class, **steps)
    assert len(tokens) == 64
    assert_same_tokens(tokens, reference_mode_tokens(twin, **steps), f"quantized ({device_class}) vs dequantised twin")


def test_the_real_structure_loads_in_each_format(tmp_path):
    """30 layers, 128 experts, real head geometry: every name and shape of the real files."""
    for fmt in FORMATS:
        checkpoint = write_quantized_checkpoint(tmp_path / fmt, fmt, "structure", twin=tmp_path / f"{fmt}-twin")
        ours, config, _ = load_model(checkpoint, torch.bfloat16, progress=False)
        dense, _, _ = load_model(tmp_path / f"{fmt}-twin", torch.bfloat16, progress=False)
        case = make_case([9], 0, 8, seed=2)
        assert torch.equal(our_logits(ours, config, case, None), our_logits(dense, config, case, None)), fmt
        if fmt == "nvfp4-modelopt":  # and through the Triton kernel (its interpreter) as an RTX 30xx runs it, in fp32
            triton, _, _ = load_model(checkpoint, torch.float32, progress=False, device_class="sm86")
            dense, _, _ = load_model(tmp_path / f"{fmt}-twin", torch.float32, progress=False)
            assert triton.layers[0].experts.path.kernel == "triton"
            logits, expected = our_logits(triton, config, case, None), our_logits(dense, config, case, None)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        shutil.rmtree(tmp_path / fmt), shutil.rmtree(tmp_path / f"{fmt}-twin")


# ---- bad inputs -------------------------------------------------------------------------------------------------


def _broken(pair, tmp_path, edit_tensors=None, edit_config=None) -> Path:
    fmt, checkpoint, _ = pair
    out = shutil.copytree(checkpoint, tmp_path / "broken")
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(fmt, tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    return out


SCALE = "model.decoder.layers.1.experts.2.down_proj.weight_scale"


def _packed(fmt: str) -> str:
    return "model.decoder.layers.1.experts.2.up_proj." + ("weight_packed" if fmt == "nvfp4-ct" else "weight")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda fmt, t: t.pop(SCALE), "missing"),
        (lambda fmt, t: t.__setitem__(SCALE, t[SCALE][:-1]), "has shape"),
        (lambda fmt, t: t.__setitem__(SCALE, t[SCALE].float()), "the format stores"),
        (lambda fmt, t: t.__setitem__(_packed(fmt), t[_packed(fmt)][:, :-1].contiguous()), "has shape"),
    ],
    ids=["missing scale", "misshapen scale", "scale dtype", "truncated packed weight"],
)
def test_bad_tensors_fail_at_load_naming_them(pair, tmp_path, edit, message):
    fmt = pair[0]
    broken = _broken(pair, tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(broken, progress=False)
    assert (SCALE if "packed" not in str(error.value) and "up_proj" not in str(error.value) else _packed(fmt)) in str(
        error.value
    )


def _unknown_scheme(qc: dict) -> None:
    if "quant_algo" in qc:
        qc["quant_algo"] = "FP8"
    else:
        qc["format"] = qc["config_groups"]["group_0"]["format"] = "int-quantized"


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda qc: qc.update(quant_method="gptq"), "quant_method"),
        (lambda qc: _unknown_scheme(qc), ""),
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=3), "num_bits"),
        (lambda qc: qc["config_groups"]["group_0"].update(targets=["Conv2d"]), "targets"),
    ],
    ids=["method", "algo or format", "bits", "targets"],
)
def test_unsupported_schemes_fail_naming_the_field(pair, tmp_path, edit, field):
    with pytest.raises(ConfigError, match=f"quantization_config.*{field}"):
        load_model(_broken(pair, tmp_path, edit_config=edit), progress=False)


def test_a_truncated_file_fails_at_load(pair, tmp_path):
    broken = _broken(pair, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(broken, progress=False)


# ---- load-time quantization ---------------------------------------------------------------------------------------


# fp8 also quantizes attention, to which the tiny random model's logits are far more sensitive than to its experts.
@pytest.mark.parametrize("scheme, weight_error, logit_error", [("fp8", 0.04, 0.5), ("nvfp4", 0.15, 0.02)])
def test_a_bf16_checkpoint_quantizes_at_load(tiny_checkpoint, scheme, weight_error, logit_error):
    ours, config, _ = load_model(tiny_checkpoint, torch.float32, progress=False, quantization=scheme)
    dense, _, _ = load_model(tiny_checkpoint, torch.float32, progress=False)
    experts = ours.layers[1].experts
    assert isinstance(experts, quant.QuantExperts) and experts.gate_up_proj.scheme == scheme
    assert isinstance(ours.layers[1].self_attn.q_proj, quant.QuantLinear) == (scheme == "fp8")
    w, reference = experts.gate_up_proj.dequantize(torch.float32), dense.layers[1].experts.gate_up_proj
    assert 0 < (w - reference).norm() / reference.norm() < weight_error
    case = make_case([12], 1, config.canvas_length, seed=4)
    a, b = our_logits(ours, config, case, None), our_logits(dense, config, case, None)
    assert not torch.equal(a, b) and (a - b).norm() / b.norm() < logit_error


def test_quantization_of_a_quantized_checkpoint_is_refused(pair):
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(pair[1], progress=False, quantization="fp8")


# ---- compute paths ------------------------------------------------------------------------------------------------


def test_the_w8a8_linear_computes_what_the_exact_path_does(tmp_path):
    """torch._scaled_mm has a CPU kernel: the sm89+ linear within fp8's activation rounding of the exact one."""
    model, _, _ = load_model(write_quantized_checkpoint(tmp_path / "fp8", "fp8", "tiny"), torch.float32, progress=False)
    linear = model.layers[1].self_attn.q_proj
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    exact = linear(x)
    linear.path = "w8a8"
    assert 0 < (linear(x) - exact).norm() / exact.norm() < 0.05


def test_quantized_experts_stay_sync_free(pair):
    """No op that waits on the device or sizes its output from data (CUDA graphs, fullgraph)."""
    model, _, _ = load_model(pair[1], torch.float32, progress=False, expert_row_alignment=4)
    x = torch.randn(24, 64)
    weights, ids = torch.rand(24, 2), torch.randint(0, 8, (24, 2))
    with OpCounter() as counter:
        model.layers[1].experts(x, weights, ids)
        model.layers[1].mlp(x)
        model.layers[1].self_attn.q_proj(x)
    assert counter.syncing() == {}


def test_a_quantized_denoising_step_is_sync_free(pair):
    counter = count_step(denoising_engine(str(pair[1]), 2))
    assert counter.syncing() == {} and sum(counter.ops.values()) > 0


def test_the_fp8_grouped_gemm_call_fits_its_kernel_on_the_real_shapes():
    """torch._scaled_grouped_mm has no CPU kernel; its meta kernel checks dtypes, layouts and shapes as CUDA's does."""
    cfg = config_json("structure")
    cfg["text_config"].update(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704)
    config = model_config_from_dict(cfg)
    with torch.device("meta"):
        experts = quant.QuantExperts(Experts(config, 4), quant.load_time_plan("fp8"))
        x, weights = torch.randn(256, 2816, dtype=torch.bfloat16), torch.rand(256, 8)
        ids = torch.randint(0, 128, (256, 8))
    experts.set_path(expert_path(torch.device("meta"), torch.bfloat16, "fp8", "sm90"))
    out = experts(x, weights, ids)
    assert out.shape == (256, 2816) and out.dtype == torch.bfloat16
