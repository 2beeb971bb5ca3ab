"""The Triton grouped MoE GEMM (models/moe_triton.py, issue 22) under Triton's interpreter on CPU tensors: each format
against the exact dequantise-then-matmul reference `grouped_linear`, the in-register dequantisation bit for bit, tiny
and real expert shapes, every group layout, and one opaque op to torch.compile.

Tolerances: with fp32 activations the kernel and the reference multiply the same fp32 operands and differ only in the
order of their fp32 sums, so they agree to ~1e-6 of the output's scale (asserted: 2e-6 x max |ref| + 1e-6 relative).
With bf16 activations the interpreter stores bf16 by truncation where GPUs round to nearest, hence one bf16 ulp."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks.step_ops import OpCounter
from models.diffusion_gemma import grouped_linear
from models.moe_triton import FORMATS, LAUNCH_CONFIGS, LaunchConfig, available, grouped_gemm, launch_config
from models.quant import dequantize_fp8, dequantize_nvfp4, quantize_fp8, quantize_nvfp4, quantize_rows

triton = pytest.importorskip("triton")
CONFIG = launch_config(None, "bf16")  # the interpreter's tiles
BLOCK_M = CONFIG.block_m
# The kernel's format, and for nvfp4 whether scale_2 is stored as a divisor (compressed-tensors).
CASES = ("bf16", "fp8", "fp8_w8a8", "nvfp4", "nvfp4-divisor")

# tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported: the kernel runs on CPU tensors.
pytestmark = pytest.mark.skipif(not available(), reason="triton's interpreter is off")


class Weights:
    """One case's weights: the kernel's arguments, and the dequantised fp32 weight the reference multiplies."""

    def __init__(self, case: str, qweight: torch.Tensor, dequantized: torch.Tensor, **scales: torch.Tensor) -> None:
        self.fmt = "nvfp4" if case == "nvfp4-divisor" else case
        self.divisor = case == "nvfp4-divisor"
        self.qweight, self.dequantized, self.scales = qweight, dequantized.float(), scales

    def run(self, x: torch.Tensor, offsets: torch.Tensor, config: LaunchConfig = CONFIG) -> torch.Tensor:
        if self.fmt != "fp8_w8a8":
            return grouped_gemm(x, offsets, self.fmt, self.qweight, config, divisor=self.divisor, **self.scales)
        rows, row_scale = quantize_rows(x)
        return grouped_gemm(rows, offsets, self.fmt, self.qweight, config, row_scale=row_scale, out_dtype=x.dtype,
                            **self.scales)  # fmt: skip

    def reference(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp8_w8a8":  # the activations the W8A8 GEMM sees: x through its per-row fp8 quantization
            rows, row_scale = quantize_rows(x)
            x = rows.float() * row_scale
        return grouped_linear(x.float(), self.dequantized, offsets)


def make_weights(case: str, weight: torch.Tensor) -> Weights:
    """`weight` [E, out, in] in the case's format, quantized as its checkpoints are."""
    if case == "bf16":
        return Weights(case, weight, weight)
    if case.startswith("fp8"):  # W8A8 scales the fp32 product; weight-only multiplies the bf16-rounded weight
        q, scale = quantize_fp8(weight)
        return Weights(case, q, q.float() * scale.float() if case == "fp8_w8a8" else dequantize_fp8(q, scale),
                       scale=scale)  # fmt: skip
    q, scale, scale_2 = quantize_nvfp4(weight)
    scale_2 = scale_2.expand(*weight.shape[:-1], 1).contiguous()
    if case == "nvfp4-divisor":
        scale_2 = 1 / scale_2
    divisor = case == "nvfp4-divisor"
    return Weights(case, q, dequantize_nvfp4(q, scale, scale_2, divisor), scale=scale, scale_2=scale_2)


def random_codes(case: str, e: int, out: int, in_: int, generator: torch.Generator) -> Weights:
    """Random bit patterns of the case's codes (NaN excepted) and per-row global scales: all a decoder can misread."""

    def fp8_codes(*shape: int, signed: bool = True) -> torch.Tensor:  # e4m3fn codes but NaN (0x7f, 0xff)
        codes = torch.randint(0, 0x7F, shape, generator=generator, dtype=torch.uint8)
        if signed:
            codes |= torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8) << 7
        return codes.view(torch.float8_e4m3fn)

    if case == "fp8":
        q, scale = fp8_codes(e, out, in_), (torch.rand(e, out, 1, generator=generator) + 0.01).bfloat16()
        return Weights(case, q, dequantize_fp8(q, scale), scale=scale)
    divisor = case == "nvfp4-divisor"
    q = torch.randint(0, 256, (e, out, in_ // 2), generator=generator, dtype=torch.uint8)
    scale = fp8_codes(e, out, in_ // 16, signed=False)  # positive block scales, subnormals included
    scale_2 = torch.rand(e, out, 1, generator=generator) * 1e-2 + 1e-4
    return Weights(case, q, dequantize_nvfp4(q, scale, scale_2, divisor), scale=scale, scale_2=scale_2)


def grouped_rows(
    counts: list[int], num_rows: int | None, width: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, offsets): counts[e] random rows for expert e, its group padded with zero rows to a multiple of BLOCK_M, as
    Experts._grouped builds them; num_rows in all, by default Experts' static T*K + E*(BLOCK_M-1)."""
    padded = [-(-c // BLOCK_M) * BLOCK_M for c in counts]
    offsets = torch.tensor(padded).cumsum(0).to(torch.int32)
    x = torch.zeros(num_rows or sum(counts) + len(counts) * (BLOCK_M - 1), width, dtype=dtype)
    start = 0
    for count, end in zip(counts, offsets.tolist(), strict=True):
        x[start : start + count] = torch.randn(count, width, generator=generator).to(dtype)
        start = end
    return x, offsets


def assert_matches(out: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor, relative: float = 2e-6) -> None:
    """Rows up to offsets[-1] (the rest are undefined) within `relative` of the output's scale."""
    n = int(offsets[-1])
    out, ref = out[:n].float(), ref[:n].float()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=relative * ref.abs().max().item())


# ---- the dequantised weight tile, bit for bit ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fp8", "nvfp4", "nvfp4-divisor"])
def test_dequantised_weights_are_bit_equal(case: str) -> None:
    """x = identity rows, so out = W[e].T: every code and scale decoded exactly as dequantize_fp8 / dequantize_nvfp4
    (bf16 products rounded to nearest even), including a K tail (48 < block_k) and an N tail (40 < block_n)."""
    e, out, in_ = 2, 40, 48
    weights = random_codes(case, e, out, in_, torch.Generator().manual_seed(1))
    x = torch.eye(in_).repeat(e, 1)
    offsets = torch.arange(1, e + 1, dtype=torch.int32) * in_
    got = weights.run(x, offsets).view(e, in_, out)
    assert torch.equal(got, weights.dequantized.mT)


# ---- each format against the dequantise-then-matmul reference -------------------------------------------------------

# (rows per expert, buffer rows): Experts' buffer, with empty experts first and last and counts off the block; all rows
# on one expert; the last group ending exactly at the buffer's end (112 = the padded groups).
LAYOUTS = {
    "scattered": ([0, 5, 16, 0, 33, 1, 7, 0], None),
    "one_expert": ([0, 0, 0, 45, 0, 0, 0, 0], None),
    "ends_at_buffer_end": ([9, 0, 17, 3, 0, 0, 1, 30], 112),
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_tiny_shapes_match_reference(case: str, name: str) -> None:
    generator = torch.Generator().manual_seed(2)
    counts, num_rows = LAYOUTS[name]
    weights = make_weights(case, torch.randn(len(counts), 48, 80, generator=generator))
    x, offsets = grouped_rows(counts, num_rows, 80, generator)
    assert (int(offsets[-1]) == x.shape[0]) == (name == "ends_at_buffer_end")
    assert_matches(weights.run(x, offsets), weights.reference(x, offsets), offsets)


@pytest.mark.parametrize("case", ["bf16", "fp8", "nvfp4"])
def test_bf16_activations(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 x, the dtype GPUs serve: the weight tile is cast to bf16 before the dot. triton 3.9's interpreter
    multiplies bf16 operands as their raw uint16 bits, so its dot is given the widening every GPU MMA does."""
    from triton.runtime.interpreter import InterpreterBuilder

    dot = InterpreterBuilder.create_dot

    def widening_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == triton.language.bfloat16:
            a, b = self.cast_impl(a, triton.language.float32), self.cast_impl(b, triton.language.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", widening_dot)
    generator = torch.Generator().manual_seed(3)
    weights = make_weights(case, torch.randn(4, 48, 80, generator=generator).bfloat16())
    x, offsets = grouped_rows([7, 0, 20, 16], None, 80, generator, torch.bfloat16)
    out = weights.run(x, offsets)
    assert out.dtype == torch.bfloat16
    n = int(offsets[-1])
    ref = grouped_linear(x, weights.dequantized.bfloat16(), offsets)[:n].float()
    torch.testing.assert_close(out[:n].float(), ref, rtol=2**-7, atol=1e-3)


# ---- the real expert shapes ------------------------------------------------------------------------------------------

HIDDEN, INTERMEDIATE, EXPERTS = 2816, 704, 128
REAL_COUNTS = {5: 13, 77: 1, 127: 22}  # 36 routed rows on three experts (64 padded rows of 83), the others empty


# Each format once at a real shape, nvfp4 (the most decoding) at both; gate_up has K and N tails at the interpreter's
# tiles (2816 = 5.5 x 512, 1408 = 5.5 x 256), down a K tail (704).
REAL_CASES = [("nvfp4", "gate_up"), ("nvfp4", "down"), ("fp8", "down"), ("fp8_w8a8", "down"), ("bf16", "down")]


@pytest.mark.parametrize(("case", "projection"), REAL_CASES)
def test_real_expert_shapes(case: str, projection: str) -> None:
    """gate_up [128, 1408, 2816] and down [128, 2816, 704]: only the routed experts' weights are filled (the rest is
    never read); the reference multiplies those experts alone, with their offsets."""
    out, in_ = (2 * INTERMEDIATE, HIDDEN) if projection == "gate_up" else (HIDDEN, INTERMEDIATE)
    generator = torch.Generator().manual_seed(4)
    used = list(REAL_COUNTS)
    routed = make_weights(case, torch.randn(len(used), out, in_, generator=generator).bfloat16())
    full = Weights(case, _scatter(routed.qweight, used), routed.dequantized,
                   **{name: _scatter(t, used) for name, t in routed.scales.items()})  # fmt: skip
    counts = [REAL_COUNTS.get(e, 0) for e in range(EXPERTS)]
    x, offsets = grouped_rows(counts, 83, in_, generator)
    routed_offsets = offsets[used]
    got = full.run(x, offsets)
    assert_matches(got, routed.reference(x, routed_offsets), routed_offsets)


def _scatter(tensor: torch.Tensor, used: list[int]) -> torch.Tensor:
    """An [EXPERTS, ...] tensor holding `tensor`'s experts at `used`, uninitialised elsewhere (never read)."""
    full = torch.empty(EXPERTS, *tensor.shape[1:], dtype=tensor.dtype)
    full[used] = tensor
    return full


# ---- torch.compile and op counts -------------------------------------------------------------------------------------


def test_one_opaque_op_under_compile() -> None:
    """fullgraph compiles around the kernel as one op, which runs it; eager dispatches exactly that one op."""
    generator = torch.Generator().manual_seed(5)
    weights = make_weights("nvfp4", torch.randn(4, 48, 80, generator=generator))
    x, offsets = grouped_rows([7, 0, 20, 16], None, 80, generator)

    def step(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return weights.run(x, offsets)

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    n = int(offsets[-1])
    assert torch.equal(compiled(x, offsets)[:n], step(x, offsets)[:n])
    (graph,) = graphs
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert calls == [torch.ops.dgserve.triton_grouped_gemm.default]
    with OpCounter() as counter:
        step(x, offsets)
    assert dict(counter.ops) == {"dgserve::triton_grouped_gemm": 1}


# ---- compiled for GPUs (triton's own ptxas, no GPU needed) ----------------------------------------------------------

# The interpreter runs the kernel as Python; this compiles it to each GPU's machine code as the launcher would (ints
# and pointers divisible by 16), which checks what only compilation can: the constexpr branches, the types each format
# feeds tl.dot, and that the tiles' pipelined shared memory fits the device class (largest per-block opt-in).
SHARED_MEMORY = {80: 166912, 89: 101376, 90: 232448, 120: 101376}
COMPILED = [(80, "nvfp4", "bf16", True), (89, "fp8_w8a8", "bf16", False), (90, "nvfp4", "bf16", False),
            (120, "fp8", "bf16", False)]  # fmt: skip


def compile_for_gpu(arch: int, fmt: str, activation: str, divisor: bool) -> int:
    """Compiles the kernel for sm_`arch` with this launch config; returns its shared memory in bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from models.moe_triton import _grouped_gemm_kernel

    config = launch_config(divmod(arch, 10), fmt)
    signature = {
        "x_ptr": "*fp8e4nv" if fmt == "fp8_w8a8" else f"*{activation}",
        "w_ptr": {"bf16": "*bf16", "fp8_w8a8": "*fp8e4nv"}.get(fmt, "*u8"),
        "scale_ptr": "*u8" if fmt == "nvfp4" else "*bf16",
        "scale_2_ptr": "*fp32", "row_scale_ptr": "*fp32", "offsets_ptr": "*i32", "out_ptr": f"*{activation}",
        "n_out": "i32", "k_in": "i32", "stride_xm": "i32", "stride_om": "i32",
    }  # fmt: skip
    constants = {"NUM_EXPERTS": EXPERTS, "EXPERTS_POW2": EXPERTS, "FMT": fmt, "DIVISOR": divisor,
                 "DOT_PRECISION": "ieee" if activation == "fp32" else None, "BLOCK_M": config.block_m,
                 "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(signature))}
    names = [*signature, *constants]
    source = ASTSource(JITFunction(_grouped_gemm_kernel), signature | dict.fromkeys(constants, "constexpr"),
                       {(names.index(name),): value for name, value in constants.items()}, attrs)  # fmt: skip
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared


def test_compiles_for_gpus() -> None:
    """In a process without TRITON_INTERPRET (triton's own library must be compiled, not interpreted)."""
    code = (
        "from tests.models.test_moe_triton import COMPILED, compile_for_gpu\n"
        "for case in COMPILED:\n"
        "    print(*case, compile_for_gpu(*case))\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, stated (the dequantisation has no mul-add to fuse)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for line, (arch, *_) in zip(run.stdout.splitlines(), COMPILED, strict=True):
        shared = int(line.split()[-1])
        assert 0 < shared <= SHARED_MEMORY[arch], line


# ---- launch configs and the optional import --------------------------------------------------------------------------


def test_launch_configs() -> None:
    classes = {(8, 0): "sm80", (8, 6): "sm86", (8, 9): "sm86", (9, 0): "sm90", (10, 0): "sm100", (12, 0): "sm120",
               (12, 1): "sm120", (7, 5): "sm80", None: "interpreter"}  # fmt: skip
    for capability, name in classes.items():
        assert launch_config(capability, "nvfp4") == LAUNCH_CONFIGS[name]
    for config in LAUNCH_CONFIGS.values():
        # M tiles of one expert each (the caller pads groups to block_m); whole nvfp4 scale groups per K tile.
        assert config.block_m >= 16 and config.block_k % 16 == 0
        assert all(b & (b - 1) == 0 for b in (config.block_m, config.block_n, config.block_k))
    assert launch_config((8, 9), "fp8_w8a8").block_k == 2 * launch_config((8, 9), "fp8").block_k
    assert set(FORMATS) == {"bf16", "fp8", "fp8_w8a8", "nvfp4"}
    with pytest.raises(ValueError, match="'int4'"):
        launch_config((9, 0), "int4")


def test_imports_without_triton() -> None:
    """A CPU install without triton imports the module (and the model); the kernels are then unavailable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import models.quant, models.moe_triton as m\n"
        "assert not m.available()\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[2])
