"""The denoising step is GPU-shaped, on a checkpoint with the real model's structure at a tiny width (30 layers,
128 experts top-8, real head geometry and vocabulary): no op that waits on the device or sizes its output from data,
and no work per row (the op count at 16 rows is that of one row)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_ops import count_formats, count_step, denoising_engine
from engine.model_runner import bucket_size
from models.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def structure_checkpoint(tmp_path_factory) -> str:
    return str(write_random_checkpoint(tmp_path_factory.mktemp("structure"), "structure", dtype=torch.bfloat16))


def test_a_denoising_step_has_no_syncs_and_no_per_row_work(structure_checkpoint):
    one, sixteen = (count_step(denoising_engine(structure_checkpoint, rows)) for rows in (1, 16))
    assert one.syncing() == {} and sixteen.syncing() == {}
    ops_one, ops_sixteen = sum(one.ops.values()), sum(sixteen.ops.values())
    assert ops_sixteen <= 1.15 * ops_one, f"{ops_one} ops at B=1, {ops_sixteen} at B=16"


@pytest.mark.parametrize("rows, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 12)])
def test_steps_run_over_power_of_two_buckets_of_slots(rows, bucket):
    assert bucket_size(rows, 12) == bucket


# (format, device class) -> the bf16 step it is held against: the same class, or one that runs the same bf16 kernel.
FORMAT_CLASSES = {
    (None, "sm86"): None, (None, "sm90"): None,
    ("fp8", "sm86"): "sm86", ("fp8", "sm89"): "sm86", ("fp8", "sm90"): "sm90",
    ("nvfp4", "sm120"): "sm86", ("nvfp4", "sm90"): "sm90",
}  # fmt: skip


def test_every_format_runs_one_grouped_gemm_per_projection_on_every_device_class(structure_checkpoint):
    """The kernels each GPU class would run (GPU-only GEMMs answered with zeros: benchmarks/step_ops.py): no loop over
    experts, ops within 1.3x of bf16's, nothing that syncs."""
    results = {}
    for scheme in (None, "fp8", "nvfp4"):
        classes = [c for s, c in FORMAT_CLASSES if s == scheme]
        results.update(count_formats(structure_checkpoint, [scheme], classes, [1]))
    layers = 30
    for (scheme, device_class), dense_class in FORMAT_CLASSES.items():
        counter, path = results[scheme, device_class, 1]
        assert counter.syncing() == {}, (scheme, device_class)
        gemms = counter.ops["dgserve::triton_grouped_gemm"] + counter.ops["dgserve::grouped_mm"]
        gemms += counter.ops["aten::_scaled_grouped_mm"]
        assert gemms == 2 * layers, (scheme, device_class, path)  # gate_up and down, once per layer
        assert max(counter.ops.values()) < 128 * layers, counter.ops.most_common(3)  # nothing once per expert
        if dense_class is not None:
            ops, dense = sum(counter.ops.values()), sum(results[None, dense_class, 1][0].ops.values())
            assert ops <= 1.3 * dense, f"{scheme} on {device_class}: {ops} ops against bf16's {dense} ({path})"
