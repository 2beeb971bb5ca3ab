"""Admission, not OOM (issue 23), against one real `dgserve serve` process through the official client: long prompts
beyond the KV budget wait in the queue and all finish, and an allocation failure fails only its iteration.

The server runs under fault_launcher.py, which makes the engine's next allocation fail whenever the trigger file exists.
An 800 KiB budget holds three 200-token prompts at once (16 KiB pages of 32 tokens, 16 slots of 24 KiB)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.reliability.fault_launcher import launcher
from tests.reliability.test_lifecycle import metric
from tests.server.conftest import start_server, stop_server

SHORT = dict(model="tiny", max_tokens=8, extra_body={"diffusion": {"steps": 2}})


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory-pressure")
    trigger = tmp / "fail-next-allocation"
    live = start_server(
        tiny_checkpoint, tmp / "server.log", "--kv-budget-bytes", str(800 * 2**10), "--max-num-seqs", "16",
        "--max-num-batched-tokens", "256", "--prefill-chunk", "128", launcher=launcher(f"oom-file:{trigger}"),
    )  # fmt: skip
    live.trigger = trigger
    yield live
    stop_server(live)


def test_sixteen_long_prompts_beyond_the_budget_queue_and_all_finish(server):
    """The other thirteen wait, none fails, and the pool's charge never passes its size."""
    client = server.client(timeout=120)
    results: list[int] = []

    def complete(i: int) -> None:
        prompt = [(7 * i + j) % 2000 + 1 for j in range(200)]
        results.append(client.completions.create(prompt=prompt, **SHORT).usage.prompt_tokens)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    used, waited = [], False
    with httpx.Client(base_url=server.url, timeout=10) as http:
        budget = metric(http, "dgserve_kv_cache_budget_bytes")
        while any(thread.is_alive() for thread in threads):
            used.append(metric(http, "dgserve_kv_cache_used_bytes"))
            waited |= metric(http, "dgserve_num_requests_waiting") > 0
            time.sleep(0.25)
    for thread in threads:
        thread.join()
    assert results == [200] * 16  # every request finished
    assert max(used) <= budget
    assert waited, "no request ever waited: the budget did not bind"


def test_an_allocation_failure_fails_only_its_iteration(server):
    client = server.client(timeout=60)
    server.trigger.touch()
    with pytest.raises(openai.InternalServerError) as failed:
        client.completions.create(prompt="during", **SHORT)
    assert failed.value.status_code == 500 and "out of memory" in failed.value.message
    assert not server.trigger.exists()  # the failure was the injected one
    assert client.completions.create(prompt="after", **SHORT).usage.completion_tokens == 8
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        assert metric(http, "dgserve_kv_cache_used_bytes") == 0  # the failed request's pages were freed
    assert "out of memory in an iteration" in server.logs()
