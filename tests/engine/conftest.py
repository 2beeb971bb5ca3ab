"""Engine fixtures on the tiny checkpoint."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import Engine


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    """The real engine in its default (fast, batch-invariant) mode."""
    return Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * 2**20, max_num_seqs=4, max_waiting=8))
