"""Triton grouped GEMM for the routed experts: one kernel launch per projection, weights dequantised in registers.

The rows arrive sorted by expert, each expert's group padded to a multiple of BLOCK_M rows (Experts._grouped with
row_alignment = block_m), so every M-tile belongs to exactly one expert. `offsets` int32 [E] holds the cumulative
group ends; the tile starting at row r belongs to expert e = #{offsets <= r}, counted in-kernel from the E offsets
(no torch op, no host sync), and tiles at or past offsets[-1] return at once: their rows' output is undefined, as
`models.diffusion_gemma.grouped_linear`'s.

Formats (layouts as in models/quant.py; each weight dequantised exactly as its format's library does, in fp32 bits):
- "bf16": weight [E, out, in] in any float dtype, cast to the activation dtype.
- "fp8": weight-only W8A16, qweight float8_e4m3fn [E, out, in], scale bf16 [E, out, 1]: w = bf16(bf16(q) * scale).
- "fp8_w8a8": x already quantized per row (models.quant.quantize_rows: fp8 rows, fp32 row scales [N, 1]); an fp8 x fp8
  dot with fp32 accumulation, then times the row and column scales. Needs fp8 MMA (sm89, sm120; and sm90/sm100).
- "nvfp4": qweight uint8 [E, out, in/2] (low nibble = even column), scale float8_e4m3fn [E, out, in/16], scale_2 fp32
  [E, out, 1]: w = bf16(e2m1(q) * (fp32(scale) * scale_2)), or `/ scale_2` with `divisor`.

The weight-only paths decode e2m1, e4m3 and the bf16 rounding with integer bit arithmetic rather than Triton's fp8
and bf16 conversions: sm80 has no native fp8 conversion, and the interpreter rounds fp32 -> bf16 by truncation, so bit
arithmetic is what runs, and rounds, identically on every GPU and under the interpreter (which is how the tests run it
on CPU: TRITON_INTERPRET=1).

Triton is optional: this module imports without it (available() is then False). The kernel is decorated on first use;
to run it on CPU tensors, set TRITON_INTERPRET=1 before triton is imported (triton.language's own jitted functions,
such as tl.sum, are decorated then).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

try:  # optional: without triton this module imports, and available() is False
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

FORMATS = ("bf16", "fp8", "fp8_w8a8", "nvfp4")


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Tile sizes and pipelining of one kernel launch; block_m is also the row alignment the caller pads groups to."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One entry per device class, chosen at load: no autotuning, so a compiled step launches what was chosen. A decode-sized
# batch routes ~16 rows to an expert (B = 1: 256 tokens x top-8 of 128 experts), so block_m = 16 (mma.sync's M) wastes
# little on padding and the weight read dominates: the K pipeline is as deep as shared memory allows. sm90/sm100 take
# M = 64 tiles (one wgmma warpgroup) for the larger batches they serve; consumer parts (sm86/89, sm120/121: ~100 KB of
# shared memory per block against 164-228 KB) take fewer stages. GPUs not listed get sm80's. The interpreter's cost is
# per op, not per FLOP, so it takes the largest tiles (and ignores warps and stages).
LAUNCH_CONFIGS = {
    "sm80": LaunchConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4),
    "sm86": LaunchConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3),
    "sm90": LaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    "sm100": LaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    "sm120": LaunchConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3),
    "interpreter": LaunchConfig(block_m=16, block_n=256, block_k=512, num_warps=4, num_stages=1),
}


def device_class(capability: tuple[int, int] | None) -> str:
    """The LAUNCH_CONFIGS key of an NVIDIA compute capability; None: CPU tensors, i.e. the interpreter."""
    if capability is None:
        return "interpreter"
    major, minor = capability
    if major == 8:
        return "sm80" if minor == 0 else "sm86"  # sm86/87/89: RTX 30xx/40xx, A10, L4, L40S, Orin
    return {9: "sm90", 10: "sm100", 12: "sm120"}.get(major, "sm80")


def launch_config(capability: tuple[int, int] | None, fmt: str) -> LaunchConfig:
    """The launch config for `fmt` on a device of this capability. fp8 x fp8 dots take twice the K per tile: the same
    bytes per pipeline stage as bf16, and fp8 MMA's K of 32 fits twice."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown grouped GEMM format {fmt!r}; choose from {list(FORMATS)}")
    config = LAUNCH_CONFIGS[device_class(capability)]
    if fmt == "fp8_w8a8" and capability is not None:  # (the interpreter's K tile is already its widest)
        config = dataclasses.replace(config, block_k=2 * config.block_k)
    return config


def available() -> bool:
    """Whether the kernels can run: triton installed, and a CUDA GPU or TRITON_INTERPRET=1 (CPU tensors)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    scale_2_ptr,
    row_scale_ptr,
    offsets_ptr,
    out_ptr,
    n_out,
    k_in,
    stride_xm,
    stride_om,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    FMT: tl.constexpr,
    DIVISOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows, cols] of one [BLOCK_M, BLOCK_N] tile; the loop runs over K in BLOCK_K steps."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # The tile's expert: the number of groups ending at or before its first row (groups are BLOCK_M-aligned).
    experts = tl.arange(0, EXPERTS_POW2)
    ends = tl.load(offsets_ptr + experts, mask=experts < NUM_EXPERTS, other=0x7FFFFFFF)
    e = tl.sum((ends <= pid_m * BLOCK_M).to(tl.int32), axis=0)
    if e < NUM_EXPERTS:  # tiles past the last group have nothing to compute
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        col_ok = cols < n_out
        w_rows = e.to(tl.int64) * n_out + cols  # expert e's weight rows (output features), [BLOCK_N]
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        # Weights are read as [BLOCK_K, BLOCK_N] tiles of W[e].T; nvfp4 reads each byte for its two columns and each
        # group scale for its 16.
        if FMT == "nvfp4":
            w_ptrs = w_ptr + w_rows[None, :] * (k_in // 2) + ks[:, None] // 2
            group_scale_ptrs = scale_ptr + w_rows[None, :] * (k_in // 16) + ks[:, None] // 16
            nibble_shift = (ks[:, None] % 2) * 4  # the low nibble holds the even column
            global_scale = tl.load(scale_2_ptr + w_rows, mask=col_ok, other=1.0)[None, :]
        else:
            w_ptrs = w_ptr + w_rows[None, :] * k_in + ks[:, None]
            if FMT != "bf16":
                col_scale = tl.load(scale_ptr + w_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            k_ok = ks < k_in - k0
            w_ok = k_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=w_ok, other=0.0)
            if FMT == "fp8" or FMT == "nvfp4":
                # e4m3fn codes (fp8 weights, or nvfp4's group scales): sign, exponent bits (bias 7), 3 mantissa bits.
                bits = (w if FMT == "fp8" else tl.load(group_scale_ptrs, mask=w_ok, other=0.0)).to(tl.int32)
                exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
                value = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
                value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, value)  # subnormal: m * 2^-9
                value = tl.where(bits >= 128, -value, value)  # NaN codes (never written) decode as +-480
                if FMT == "fp8":
                    value = value * col_scale
                else:
                    scale = tl.math.div_rn(value, global_scale) if DIVISOR else value * global_scale
                    # e2m1 codes: sign (bit 3), 2 exponent bits (bias 1), 1 mantissa bit; exponent 0: m / 2.
                    codes = (w.to(tl.int32) >> nibble_shift) & 0xF
                    exponent, mantissa = (codes >> 1) & 3, codes & 1
                    value = (((exponent + 126) << 23) | (mantissa << 22)).to(tl.float32, bitcast=True)
                    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, value)
                    value = tl.where(codes >= 8, -value, value) * scale
                # Rounded to bf16 (ties to even) as torch rounds the reference's bf16 weight, kept in fp32.
                bits = value.to(tl.uint32, bitcast=True)
                w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            if FMT == "nvfp4":
                w_ptrs += BLOCK_K // 2
                group_scale_ptrs += BLOCK_K // 16
            else:
                w_ptrs += BLOCK_K
        if FMT == "fp8_w8a8":
            acc = acc * tl.load(row_scale_ptr + rows)[:, None] * col_scale
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


@functools.cache
def _kernel() -> Any:
    """The kernel, decorated on first use: triton reads TRITON_INTERPRET when it decorates, so the first call decides
    between compiled and interpreted."""
    return triton.jit(_grouped_gemm_kernel)


@torch.library.custom_op("dgserve::triton_grouped_gemm", mutates_args=())
def _grouped_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    fmt: str,
    qweight: torch.Tensor,
    scale: torch.Tensor | None,
    scale_2: torch.Tensor | None,
    divisor: bool,
    row_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    num_rows, num_experts, n_out = x.shape[0], qweight.shape[0], qweight.shape[1]
    out = x.new_empty(num_rows, n_out, dtype=out_dtype)
    # fp8 bytes as uint8 for the bit-arithmetic decode (the W8A8 dot takes them as fp8).
    w = qweight.view(torch.uint8) if fmt == "fp8" else qweight
    scale = scale.view(torch.uint8) if fmt == "nvfp4" else scale
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n_out, block_n))
    _kernel()[grid](
        x, w, scale, scale_2, row_scale, offsets, out,
        n_out, x.shape[1], x.stride(0), out.stride(0),
        NUM_EXPERTS=num_experts,
        EXPERTS_POW2=triton.next_power_of_2(num_experts),  # tl.arange's length
        FMT=fmt,
        DIVISOR=divisor,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32 activations: no tf32
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


@_grouped_gemm.register_fake
def _(x, offsets, fmt, qweight, scale, scale_2, divisor, row_scale, out_dtype, *config):
    return x.new_empty(x.shape[0], qweight.shape[1], dtype=out_dtype)


def grouped_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    fmt: str,
    qweight: torch.Tensor,
    config: LaunchConfig,
    scale: torch.Tensor | None = None,
    scale_2: torch.Tensor | None = None,
    divisor: bool = False,
    row_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out [N, out] = x[r] @ W[e].T for the rows r of expert e (offsets: int32 cumulative group ends, each a multiple
    of config.block_m); rows from offsets[-1] on are not computed. W is `qweight` [E, out, ...] in `fmt` with its
    scales; out_dtype defaults to x's (give it for "fp8_w8a8", whose x holds fp8 rows with fp32 `row_scale` [N, 1]).
    One opaque op to torch.compile; static shapes, no host sync, no data-dependent allocation (CUDA-graph safe)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown grouped GEMM format {fmt!r}; choose from {list(FORMATS)}")
    packed_in = qweight.shape[-1] * (2 if fmt == "nvfp4" else 1)
    if qweight.dim() != 3 or packed_in != x.shape[-1]:
        raise ValueError(f"{fmt} weight {tuple(qweight.shape)} does not take rows of width {x.shape[-1]}")
    scale, scale_2, row_scale = (t if t is None else t.contiguous() for t in (scale, scale_2, row_scale))
    return _grouped_gemm(
        x.contiguous(), offsets, fmt, qweight.contiguous(), scale, scale_2, divisor, row_scale,
        out_dtype or x.dtype, config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages,
    )  # fmt: skip
