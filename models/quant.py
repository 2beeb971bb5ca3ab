"""Quantized weights: the three published checkpoint formats, load-time quantization, dequantisation, and the GEMM
each device runs (shared/quantized-formats).

A `QuantPlan` says which linears are quantized and how: read from config.json's `quantization_config`
(`plan_from_config`), or asked for at load to quantize a bf16 checkpoint (`load_time_plan`). `apply_plan` swaps those
modules of a model built on the meta device for `QuantLinear` / `QuantExperts`, as gpt-fast's quantize.py swaps
nn.Linear: the model file mentions neither. `quantized_specs` says which tensors, dtypes and shapes a checkpoint holds
for them, and where each one goes.

Two schemes, one in-memory layout each whatever the file format (fused experts keep gate rows, then up rows):
- fp8: `qweight` float8_e4m3fn [..., out, in], `scale` bf16 [..., out, 1]; w = bf16(q) * scale, in bf16.
- nvfp4: `qweight` uint8 [..., out, in / 2] (the low nibble holds the even column), `scale` float8_e4m3fn
  [..., out, in / 16], `scale_2` fp32 [..., out, 1] (the files hold one per expert and projection);
  w = bf16(e2m1(q) * (fp32(scale) * scale_2)), or `/ scale_2` where the file stores it as a divisor
  (compressed-tensors' `weight_global_scale`): each format exactly as its own library dequantises.

Compute: models.gemm_path chooses each module's GEMM at load. CPU dequantises exactly, so a quantized checkpoint
reproduces its dequantised bf16 twin; GPUs run the experts as one grouped GEMM per projection (torch's fp8 kernel on
sm90/sm100, else models.moe_triton, which dequantises in registers), and fp8 linears as W8A8 GEMMs on sm89+.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import moe_triton
from models.config import ConfigError
from models.diffusion_gemma import Experts, grouped_linear

FP8, NVFP4 = "fp8", "nvfp4"
FP8_MAX, E2M1_MAX, GROUP = 448.0, 6.0, 16
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
TINY = torch.finfo(torch.float32).tiny  # keeps all-zero rows and blocks at zero instead of 0/0


@dataclass(frozen=True, slots=True)
class Field:
    """One checkpoint tensor of a quantized [out, in] linear: its suffix, dtype and shape, and what it fills."""

    suffix: str
    dtype: torch.dtype | None  # None: any floating point (a bf16 or fp32 checkpoint quantized at load)
    shape: tuple[int, ...]
    fills: str | None  # "qweight" | "scale" | "scale_2"; None: checked, then dropped (static input scales)


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """Which modules are quantized, with which scheme, and how their tensors are named in the files."""

    format: str  # "fp8", "nvfp4-modelopt", "nvfp4-ct"; "quantize-fp8" / "quantize-nvfp4": from bf16 at load
    scheme: str  # FP8 | NVFP4
    quantizes: Callable[[str], bool]  # checkpoint module name (model.decoder....) -> quantized?
    global_is_divisor: bool = False  # nvfp4-ct stores 1 / scale_2

    @property
    def from_bf16(self) -> bool:
        return self.format.startswith("quantize-")

    def fields(self, out_features: int, in_features: int) -> tuple[Field, ...]:
        """The tensors a quantized [out, in] linear has in this format's files (shared/quantized-formats)."""
        o, i = out_features, in_features
        if self.from_bf16:
            return (Field("weight", None, (o, i), "qweight"),)
        if self.format == "fp8":
            return (Field("weight", torch.float8_e4m3fn, (o, i), "qweight"),
                    Field("weight_scale", torch.bfloat16, (o, 1), "scale"))  # fmt: skip
        modelopt = self.format == "nvfp4-modelopt"
        return (
            Field("weight" if modelopt else "weight_packed", torch.uint8, (o, i // 2), "qweight"),
            Field("weight_scale", torch.float8_e4m3fn, (o, i // GROUP), "scale"),
            Field("weight_scale_2", torch.float32, (), "scale_2") if modelopt
            else Field("weight_global_scale", torch.float32, (1,), "scale_2"),
            Field("input_scale" if modelopt else "input_global_scale", torch.float32, (), None),  # W4A16: unused
        )  # fmt: skip


# ---- which format: config.json's quantization_config, or --quantization --------------------------------------------

# What dgserve quantizes at load: fp8 as RedHat's FP8-dynamic does (attention, dense MLP, experts); nvfp4 (4-bit
# weight-only) the routed experts, as NVIDIA's checkpoint does: 90 % of the weights, the rest stays bf16.
LOAD_TIME = {
    FP8: re.compile(r".*\.(self_attn|mlp)\.\w+_proj|.*\.experts\.\d+\.\w+_proj"),
    NVFP4: re.compile(r".*\.experts\.\d+\.\w+_proj"),
}
QUANTIZATION_CHOICES = tuple(LOAD_TIME)


def load_time_plan(scheme: str) -> QuantPlan:
    if scheme not in LOAD_TIME:
        raise ConfigError(f"quantization {scheme!r} is unsupported; choose from {list(LOAD_TIME)}")
    pattern = LOAD_TIME[scheme]
    return QuantPlan(f"quantize-{scheme}", scheme, lambda name: pattern.fullmatch(name) is not None)


def _not_ignored(patterns: list[str]) -> Callable[[str], bool]:
    """compressed-tensors' `ignore` (names and "re:" regexes) and ModelOpt's globs: True for a quantized module."""

    def quantized(name: str) -> bool:
        return not any(
            re.fullmatch(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns
        )

    return quantized


def _expect(block: dict[str, Any], where: str, **expected: Any) -> None:
    for key, value in expected.items():
        if block.get(key) != value:
            raise ConfigError(f"{where}.{key} is {block.get(key)!r}; dgserve supports {value!r}")


def _only_group(qc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ConfigError("quantization_config.config_groups must hold exactly one group")
    ((name, group),) = groups.items()
    where = f"quantization_config.config_groups.{name}"
    if group.get("targets") != ["Linear"]:
        raise ConfigError(f"{where}.targets is {group.get('targets')!r}; dgserve supports ['Linear']")
    return where, group


def plan_from_config(config: dict[str, Any]) -> QuantPlan | None:
    """The format config.json declares; None for a plain checkpoint. Anything else fails naming the field."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    quantized = _not_ignored(qc.get("ignore") or [])
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        where, group = _only_group(qc)
        if qc.get("quantization_status", "compressed") != "compressed":
            raise ConfigError(f"quantization_config.quantization_status {qc['quantization_status']!r} is unsupported")
        fmt, weights = group.get("format") or qc.get("format"), group.get("weights") or {}
        if fmt == "float-quantized":
            _expect(weights, f"{where}.weights", num_bits=8, type="float", strategy="channel", symmetric=True,
                    dynamic=False)  # fmt: skip
            if (acts := group.get("input_activations")) is not None:
                _expect(acts, f"{where}.input_activations", num_bits=8, type="float", strategy="token", dynamic=True)
            return QuantPlan("fp8", FP8, quantized)
        if fmt == "nvfp4-pack-quantized":
            _expect(weights, f"{where}.weights", num_bits=4, type="float", strategy="tensor_group", group_size=GROUP,
                    symmetric=True)  # fmt: skip
            return QuantPlan("nvfp4-ct", NVFP4, quantized, global_is_divisor=True)
        raise ConfigError(f"quantization_config.format {fmt!r} is unsupported (float-quantized, nvfp4-pack-quantized)")
    if method == "modelopt":
        if qc.get("quant_algo") != "NVFP4":
            raise ConfigError(f"quantization_config.quant_algo {qc.get('quant_algo')!r} is unsupported (NVFP4)")
        where, group = _only_group(qc)
        _expect(group.get("weights") or {}, f"{where}.weights", num_bits=4, type="float", group_size=GROUP)
        return QuantPlan("nvfp4-modelopt", NVFP4, quantized)
    raise ConfigError(f"quantization_config.quant_method {method!r} is unsupported (compressed-tensors, modelopt)")


# ---- quantize and dequantize ----------------------------------------------------------------------------------------


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8: q [..., out, in], bf16 scale [..., out, 1] (RedHat's FP8-dynamic weights)."""
    w = w.float()
    scale = (w.abs().amax(-1, keepdim=True) / FP8_MAX).to(torch.bfloat16)
    q = (w / scale.float().clamp(min=TINY)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (sign in bit 3) of values already divided by their scales."""
    midpoints = torch.tensor(E2M1_MIDPOINTS, device=x.device)
    magnitude = torch.bucketize(x.abs().clamp(max=E2M1_MAX), midpoints).to(torch.uint8)
    return magnitude | ((x < 0).to(torch.uint8) << 3)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 as ModelOpt writes it: packed codes [..., out, in/2], fp8 group-16 scales [..., out, in/16], and one fp32
    second scale per matrix [..., 1, 1] that puts the largest group scale at fp8's top (448)."""
    w = w.float()
    scale_2 = w.abs().amax(dim=(-2, -1), keepdim=True) / (E2M1_MAX * FP8_MAX)
    groups = w.unflatten(-1, (-1, GROUP))
    scale = (groups.abs().amax(-1) / E2M1_MAX / scale_2.clamp(min=TINY)).to(torch.float8_e4m3fn)
    codes = _e2m1_codes((groups / (scale.float() * scale_2).clamp(min=TINY)[..., None]).flatten(-2))
    return (codes[..., 1::2] << 4) | codes[..., 0::2], scale, scale_2


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """fp32 values [..., 2n] of packed codes [..., n]: 2^(e-1) * (1 + m/2), or m/2 when the exponent bits e are 0."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    exponent, mantissa = ((codes >> 1) & 3).float(), (codes & 1).float()
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, torch.exp2(exponent - 1) * (1 + 0.5 * mantissa))
    return torch.where(codes >= 8, -magnitude, magnitude)


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.to(torch.bfloat16) * scale  # in bf16, as compressed-tensors does


def dequantize_nvfp4(qweight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, divisor: bool) -> torch.Tensor:
    scales = scale.float() / scale_2 if divisor else scale.float() * scale_2
    return (e2m1_values(qweight).unflatten(-1, (-1, GROUP)) * scales[..., None]).flatten(-2).to(torch.bfloat16)


# ---- compute paths by device ----------------------------------------------------------------------------------------


def _capability(device: torch.device) -> tuple[int, int] | None:
    """An NVIDIA GPU's compute capability; None on CPU and ROCm (whose fp8 kernels are another story)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(device)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic fp8 activations: x [N, in] -> fp8 [N, in], fp32 scales [N, 1]."""
    scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=TINY)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(qweight [out, in]).T as one W8A8 GEMM: rowwise scales on both sides."""
    rows, row_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(rows, qweight.t(), scale_a=row_scale, scale_b=scale.float().t(), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], -1)


# ---- modules --------------------------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A weight [..., out, in] held quantized (layout in the module docstring); buffers, so nothing trains."""

    def __init__(self, shape: tuple[int, ...], plan: QuantPlan) -> None:
        super().__init__()
        *lead, out_features, in_features = shape
        if plan.scheme == NVFP4 and in_features % GROUP:
            raise ConfigError(f"nvfp4 needs input widths divisible by {GROUP}, got {in_features}")
        self.shape, self.scheme, self.divisor = tuple(shape), plan.scheme, plan.global_is_divisor
        if plan.scheme == FP8:
            self.register_buffer("qweight", torch.empty(shape, dtype=torch.float8_e4m3fn))
            self.register_buffer("scale", torch.empty(*lead, out_features, 1, dtype=torch.bfloat16))
        else:
            self.register_buffer("qweight", torch.empty(*lead, out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(*lead, out_features, in_features // GROUP,
                                                      dtype=torch.float8_e4m3fn))  # fmt: skip
            self.register_buffer("scale_2", torch.empty(*lead, out_features, 1, dtype=torch.float32))

    def dequantize(self, dtype: torch.dtype, index: int | slice = slice(None)) -> torch.Tensor:
        """The weight (or weight[index], e.g. one expert) as its format's library dequantises it, in `dtype`."""
        if self.scheme == FP8:
            return dequantize_fp8(self.qweight[index], self.scale[index]).to(dtype)
        return dequantize_nvfp4(self.qweight[index], self.scale[index], self.scale_2[index], self.divisor).to(dtype)

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor, index: int | slice = slice(None)) -> None:
        """Fill weight[index] from a floating-point tensor, on this module's device (load-time quantization)."""
        weight = weight.to(self.qweight.device)
        if self.scheme == FP8:
            self.qweight[index], self.scale[index] = quantize_fp8(weight)
        else:
            self.qweight[index], self.scale[index], scale_2 = quantize_nvfp4(weight)
            self.scale_2[index] = scale_2.expand_as(self.scale_2[index])


class QuantLinear(QuantizedWeight):
    """nn.Linear without bias, weight held quantized; the GEMM is chosen by device (linear_path)."""

    def __init__(self, linear: nn.Linear, plan: QuantPlan) -> None:
        super().__init__((linear.out_features, linear.in_features), plan)
        self.path = "dequantize"  # models.gemm_path.linear_path, set at load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "w8a8":
            return fp8_linear(x, self.qweight, self.scale)
        return F.linear(x, self.dequantize(x.dtype))


class QuantExperts(Experts):
    """Experts with quantized gate_up_proj [E, 2I, H] and down_proj [E, H, I]: the routing is Experts', only the
    GEMMs change (models.gemm_path). Fixed shapes and no host syncs on every path, as in Experts."""

    def __init__(self, experts: Experts, plan: QuantPlan) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: its bf16 parameters are what this class replaces
        self.num_experts, self.batch_alignment = experts.num_experts, experts.batch_alignment
        self.gate_up_proj = QuantizedWeight(tuple(experts.gate_up_proj.shape), plan)
        self.down_proj = QuantizedWeight(tuple(experts.down_proj.shape), plan)
        self.scheme = plan.scheme
        self.set_path(experts.path)

    def _grouped_linear(self, x: torch.Tensor, weight: QuantizedWeight, offsets: torch.Tensor) -> torch.Tensor:
        kernel, weights = self.path.kernel, self.path.weights
        if kernel == "grouped_mm":  # CPU: exactly as the format's library dequantises
            return grouped_linear(x, weight.dequantize(x.dtype), offsets)
        if weights == "fp8_w8a8":
            rows, row_scale = quantize_rows(x)
            if kernel == "scaled_grouped_mm":
                column_scale = weight.scale.float().squeeze(-1)
                return torch._scaled_grouped_mm(
                    rows, weight.qweight.mT, row_scale.squeeze(-1), column_scale, offs=offsets, out_dtype=x.dtype
                )
            return moe_triton.grouped_gemm(
                rows, offsets, weights, weight.qweight, self.path.launch, weight.scale, row_scale=row_scale,
                out_dtype=x.dtype,
            )  # fmt: skip
        return moe_triton.grouped_gemm(
            x, offsets, weights, weight.qweight, self.path.launch, weight.scale, getattr(weight, "scale_2", None),
            weight.divisor,
        )  # fmt: skip

    def _expert_linear(self, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        """The every-expert path (a CPU without grouped_mm): all experts dequantised at once, exactly."""
        return super()._expert_linear(x, weight.dequantize(x.dtype))


def apply_plan(model: nn.Module, plan: QuantPlan, prefix: str) -> None:
    """Swap the plan's modules of a (meta-device) model for quantized ones; `prefix` + name = the checkpoint's."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and plan.quantizes(prefix + name):
            model.set_submodule(name, QuantLinear(module, plan))
        elif isinstance(module, Experts):
            names = [f"{prefix}{name}.{e}.{p}_proj" for e in range(module.num_experts) for p in ("gate", "up", "down")]
            decisions = {plan.quantizes(n) for n in names}
            if len(decisions) > 1:
                raise ConfigError(f"{prefix}{name}: some experts are quantized and some not; dgserve needs all or none")
            if decisions == {True}:
                model.set_submodule(name, QuantExperts(module, plan))


# ---- what the files hold for quantized modules -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor the checkpoint must hold: its shape, its dtype (None: any floating point), and where it goes."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    load: Callable[[torch.Tensor], None]


def _copy_into(target: torch.Tensor) -> Callable[[torch.Tensor], None]:
    return lambda tensor: target.copy_(tensor)


def _drop(tensor: torch.Tensor) -> None:
    """Static activation scales: W4A16 and dynamic W8A8 do not use them."""


def quantized_specs(module_name: str, module: nn.Module, plan: QuantPlan, prefix: str) -> dict[str, TensorSpec]:
    """Checkpoint key -> TensorSpec for a QuantLinear or QuantExperts named `module_name` in our model."""
    key = prefix + module_name
    if isinstance(module, QuantLinear):
        return _specs(key, module, plan, ...)
    specs: dict[str, TensorSpec] = {}
    if plan.from_bf16:  # a bf16 checkpoint stores the experts fused: quantize one expert at a time
        for name, weight in (("gate_up_proj", module.gate_up_proj), ("down_proj", module.down_proj)):
            specs[f"{key}.{name}"] = TensorSpec(weight.shape, None, _quantize_experts(weight))
        return specs
    intermediate = module.down_proj.shape[-1]
    for e in range(module.num_experts):
        for proj, weight, rows in (("gate", module.gate_up_proj, slice(0, intermediate)),
                                   ("up", module.gate_up_proj, slice(intermediate, 2 * intermediate)),
                                   ("down", module.down_proj, slice(None))):  # fmt: skip
            specs.update(_specs(f"{key}.{e}.{proj}_proj", weight, plan, (e, rows)))
    return specs


def _quantize_experts(weight: QuantizedWeight) -> Callable[[torch.Tensor], None]:
    def load(tensor: torch.Tensor) -> None:
        for e in range(tensor.shape[0]):
            weight.quantize_from(tensor[e], e)

    return load


def _specs(key: str, weight: QuantizedWeight, plan: QuantPlan, index: Any) -> dict[str, TensorSpec]:
    """The files' tensors of the [out, in] linear `key`, which fill weight[index] (an expert and its rows, or all)."""
    specs = {}
    for field in plan.fields(weight.qweight[index].shape[-2], weight.shape[-1]):
        if plan.from_bf16:
            load = weight.quantize_from
        elif field.fills is None:
            load = _drop
        else:
            load = _copy_into(getattr(weight, field.fills)[index])
        specs[f"{key}.{field.suffix}"] = TensorSpec(field.shape, field.dtype, load)
    return specs
