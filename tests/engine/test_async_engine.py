"""The engine thread driven from asyncio, as the server drives it: streams, refusal, disconnects, faults, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import engine.async_engine
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.request import BlockCommitted, EngineDeadError, Failed, Finished, FinishReason, Request, SamplingParams
from models.config import ConfigError
from tests.engine.test_engine import output_tokens, prompt

MiB = 2**20


@pytest.fixture
def async_engine(tiny_checkpoint):
    engine = AsyncEngine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, max_num_seqs=4, max_waiting=4))
    yield engine
    engine.shutdown(timeout=10)


def test_the_engine_thread_loads_the_model_and_load_errors_reach_the_caller(tiny_checkpoint, tmp_path, monkeypatch):
    # One thread must run all of torch's work: a second OpenMP team (a load on the main thread) slows CPU steps ~2x.
    loaded_on = []

    class SpyEngine(engine.async_engine.Engine):
        def __init__(self, *args, **kwargs):
            loaded_on.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine.async_engine, "Engine", SpyEngine)
    served = AsyncEngine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB))
    served.shutdown(timeout=10)
    assert loaded_on == ["dgserve-engine"]
    with pytest.raises(ConfigError, match=r"config\.json"):
        AsyncEngine(EngineConfig(str(tmp_path / "missing"), kv_budget_bytes=64 * MiB))


async def collect(engine: AsyncEngine, request_id: str, ids: list[int], params: SamplingParams) -> list:
    return [event async for event in await engine.add_request(Request(request_id, tuple(ids), params))]


def test_concurrent_streams_match_the_synchronous_engine(async_engine, engine):
    requests = {
        f"r{i}": (prompt(8 + 9 * i, i), SamplingParams(max_tokens=40 + 20 * i, seed=i, stop_token_ids=()))
        for i in range(3)
    }

    async def main():
        return await asyncio.gather(*(collect(async_engine, rid, *args) for rid, args in requests.items()))

    streamed = asyncio.run(main())
    expected = engine.generate(requests)
    for (request_id, _), events in zip(requests.items(), streamed, strict=True):
        assert isinstance(events[-1], Finished) and events[-1].finish_reason is FinishReason.LENGTH
        assert output_tokens(events) == output_tokens(expected[request_id])


def test_refusal_is_raised_before_any_event(async_engine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            await async_engine.add_request(Request("bad", tuple(prompt(5, 1)), SamplingParams(max_tokens=0)))

    asyncio.run(main())


def test_closing_a_stream_aborts_the_request(async_engine):
    async def main():
        stream = await async_engine.add_request(Request("gone", tuple(prompt(10, 2)), SamplingParams(max_tokens=640)))
        async for event in stream:
            if isinstance(event, BlockCommitted):
                break  # the client disconnects after its first block
        await stream.__aiter__().aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while async_engine.engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not async_engine.engine.scheduler.running
    assert async_engine.engine.scheduler.budget.num_used == 0


def test_a_failed_forward_fails_the_requests_in_flight_and_later_ones_succeed(async_engine, monkeypatch):
    model = async_engine.engine.model
    real_denoise, calls = model.denoise, []

    def denoise_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(model, "denoise", denoise_failing_once)

    async def main():
        first = await collect(async_engine, "hit", prompt(6, 3), SamplingParams(max_tokens=64))
        second = await collect(async_engine, "after", prompt(6, 4), SamplingParams(max_tokens=32, stop_token_ids=()))
        return first, second

    first, second = asyncio.run(main())
    assert isinstance(first[-1], Failed) and "RuntimeError" in first[-1].error
    assert isinstance(second[-1], Finished) and len(output_tokens(second)) == 32
    async_engine.check_health()


def test_shutdown_fails_what_is_in_flight_and_marks_the_engine_dead(async_engine):
    async def main():
        params = SamplingParams(max_tokens=2000, stop_token_ids=())
        stream = await async_engine.add_request(Request("long", tuple(prompt(6, 5)), params))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown, 10)
        return [event async for event in stream]

    events = asyncio.run(main())
    assert isinstance(events[-1], Failed)
    with pytest.raises(EngineDeadError):
        async_engine.check_health()
