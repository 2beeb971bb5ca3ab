"""The denoising step is GPU-shaped, on a checkpoint with the real model's structure at a tiny width (30 layers,
128 experts top-8, real head geometry and vocabulary): no op that waits on the device or sizes its output from data,
and no work per row (the op count at 16 rows is that of one row)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_ops import count_step, denoising_engine
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
