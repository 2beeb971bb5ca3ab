"""Benchmark scripts (run as `python -m benchmarks.NAME`); what several of them share."""

from __future__ import annotations

import time

from engine.engine import Engine


def step_times(engine: Engine) -> list[float]:
    """Run the engine's requests to the end; the seconds each step took."""
    steps = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return steps
