"""Which GEMM the experts and the quantized linears run: chosen once at load by (device class, torch, format), logged,
and then fixed for the life of the model, so the step never asks the device again.

The experts' kernels, each one grouped GEMM per projection over the rows that the router sorts by expert:
- "grouped_mm": torch's grouped_mm on weights in the activation dtype (quantized ones dequantised first). On CPU it is
  the reference's own kernel (bit parity) and dequantisation is exact; on CUDA it is fast on sm90/sm100 in bf16 only.
- "scaled_grouped_mm": torch._scaled_grouped_mm, fp8 weights times per-token fp8 activations (sm90, sm100; bf16 out).
- "triton": models.moe_triton's grouped GEMM, weights (bf16, fp8, nvfp4) dequantised in registers; fp8 x fp8 MMA where
  the card has it (sm89+). Every other GPU, format and dtype (fp32 activations included).
- "every_expert": every expert on every token (Experts._every_expert): only where neither torch nor triton has a
  grouped GEMM (a CPU torch < 2.10 without triton). 16x the expert FLOPs; quantized GPU weights refuse it.

The quantized linears (attention, dense MLP): "w8a8" (torch._scaled_mm, fp8 on sm89+) or "dequantize" (one weight
dequantised right before its GEMM: exact on CPU, weight-only elsewhere).

`device_class` forces the choice a GPU of that class would make (analysis on the meta device, and the Triton kernels
on CPU tensors through Triton's interpreter); it is read here, at load, and nowhere on the step's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import moe_triton
from models.config import ConfigError
from models.moe_triton import LaunchConfig

# The GPU classes whose kernels differ, by compute capability.
DEVICE_CLASSES: dict[str, tuple[int, int]] = {
    "sm80": (8, 0),  # A100, A30
    "sm86": (8, 6),  # RTX 30xx, A10, A40
    "sm89": (8, 9),  # RTX 40xx, L4, L40S: fp8 MMA
    "sm90": (9, 0),  # H100, H200
    "sm100": (10, 0),  # B200, GB200
    "sm120": (12, 0),  # RTX 50xx, RTX PRO 6000: fp8 MMA
    "sm121": (12, 1),  # GB10 (DGX Spark)
}
DEVICE_CLASS_CHOICES = ("cpu", *DEVICE_CLASSES)


@dataclass(frozen=True, slots=True)
class ExpertPath:
    """The experts' GEMM: its kernel, the weight format the kernel reads, and the Triton launch config if any."""

    kernel: str  # "grouped_mm" | "scaled_grouped_mm" | "triton" | "every_expert"
    weights: str  # "dense" (the model dtype) | "fp8" | "fp8_w8a8" | "nvfp4"
    launch: LaunchConfig | None = None

    def row_alignment(self, batch_alignment: int) -> int:
        """Rows per expert group are padded to this multiple: the batch-invariance padding, and the Triton tile's
        rows so that no tile spans two experts."""
        return math.lcm(batch_alignment, self.launch.block_m if self.launch else 1)

    def __str__(self) -> str:
        weights = "bf16/fp32" if self.weights == "dense" else self.weights.replace("_", " ")
        names = {"grouped_mm": "torch grouped_mm", "scaled_grouped_mm": "torch _scaled_grouped_mm",
                 "triton": "triton", "every_expert": "every expert on every token,"}  # fmt: skip
        tile = f" (tile {self.launch.block_m}x{self.launch.block_n}x{self.launch.block_k})" if self.launch else ""
        return f"experts: {names[self.kernel]} {weights} grouped GEMM{tile}"


def torch_grouped_mm() -> Callable[..., torch.Tensor] | None:
    """torch's bf16 grouped GEMM: public from torch 2.10, private (same signature) in 2.8-2.9."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def capability(device: torch.device, device_class: str | None = None) -> tuple[int, int] | None:
    """The compute capability whose kernels to use: the forced class's, a CUDA GPU's, or None (CPU, meta, ROCm)."""
    if device_class is not None:
        if device_class not in DEVICE_CLASS_CHOICES:
            raise ConfigError(f"device class {device_class!r} is unknown; choose from {list(DEVICE_CLASS_CHOICES)}")
        return DEVICE_CLASSES.get(device_class)
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(device)


def expert_path(
    device: torch.device, dtype: torch.dtype, scheme: str | None, device_class: str | None = None
) -> ExpertPath:
    """The experts' GEMM for (device, activation dtype, weight scheme: None, "fp8" or "nvfp4")."""
    cap = capability(device, device_class)
    if cap is None and (device.type != "cuda" or device_class == "cpu"):
        # CPU (or meta): torch's kernel on exactly dequantised weights, as the reference computes.
        return ExpertPath("grouped_mm" if hasattr(F, "grouped_mm") else "every_expert", "dense")
    hopper_or_blackwell = cap is not None and cap[0] in (9, 10)
    if scheme is None and dtype == torch.bfloat16 and hopper_or_blackwell and torch_grouped_mm() is not None:
        return ExpertPath("grouped_mm", "dense")
    if scheme == "fp8" and dtype == torch.bfloat16 and hopper_or_blackwell:
        return ExpertPath("scaled_grouped_mm", "fp8_w8a8")
    # A forced class assumes that GPU's torch, which brings triton; before sm80 there is no bf16 MMA to run it on.
    if (cap is not None and cap < (8, 0)) or (device_class is None and not moe_triton.available()):
        if scheme is None:
            return ExpertPath("every_expert", "dense")
        raise ConfigError(f"{scheme} experts need triton (CUDA torch brings it) on an sm80 or newer GPU")
    fp8_mma = cap is not None and cap >= (8, 9)  # Ada, Hopper, Blackwell: fp8 x fp8 tensor-core MMA
    weights = {None: "dense", "nvfp4": "nvfp4", "fp8": "fp8_w8a8" if fp8_mma else "fp8"}[scheme]
    return ExpertPath("triton", weights, moe_triton.launch_config(cap, "bf16" if weights == "dense" else weights))


def linear_path(device: torch.device, scheme: str, device_class: str | None = None) -> str:
    """A quantized linear's GEMM: "w8a8" for fp8 on sm89+ (RTX 40xx, H100/H200, B200, RTX 50xx, GB10), else
    "dequantize" (CPU, where it is exact; Ampere; ROCm; nvfp4)."""
    cap = capability(device, device_class)
    return "w8a8" if scheme == "fp8" and cap is not None and cap >= (8, 9) else "dequantize"
