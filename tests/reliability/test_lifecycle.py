"""Shutdown, faults, cancellation storms and host checks against real `dgserve serve` processes on loopback."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.reliability.fault_launcher import launcher
from tests.server.conftest import start_server, stop_server
from tests.server.test_errors_and_endpoints import assert_openai_error

LONG = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True, "diffusion": {"steps": 48}}


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def wait_for(predicate, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(message)


def read_stream(server, body: dict, out: list) -> None:
    """Collect a streaming response's data payloads (in a thread, while the test signals the server)."""
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        out.append(r.status_code)
        out.extend(line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: "))


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "drain.log", "--drain-timeout", "60", "--drain-announce", "0")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "diffusion": {"steps": 12}}  # fmt: skip
    received: list = []
    reader = threading.Thread(target=read_stream, args=(server, body, received))
    reader.start()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        wait_for(lambda: metric(http, "dgserve_num_requests_running") == 1, 20, "the request never started")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http.get("/ready").status_code == 503, 1, "/ready did not turn 503 at once")
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
        assert_openai_error(refused, 503, "not_ready")
        assert refused.headers["retry-after"]
    reader.join(timeout=120)
    assert server.process.wait(timeout=30) == 0
    assert received[0] == 200 and received[-1] == "[DONE]"
    finish = json.loads(received[-2])["choices"][0]["finish_reason"]
    assert finish == "length"  # it finished normally during the drain
    assert sum(len(json.loads(d)["choices"][0]["text"]) > 0 for d in received[1:-1] if d != "[DONE]") >= 1


def test_sigterm_announces_the_drain_to_a_router_then_refuses_new_requests(tiny_checkpoint, tmp_path):
    """What a router in front sees: /health and /ready turn 503 at once while the requests it still sends during the
    announce are served; then new requests get 503, what is in flight is failed at the drain timeout (counted from
    the signal) and the process exits. The router reaches the replica by its compose service name, which
    --allowed-hosts lists; other names still get 403."""
    server = start_server(tiny_checkpoint, tmp_path / "announce.log", "--drain-timeout", "6", "--drain-announce", "3",
                          "--allowed-hosts", "dgserve-1")  # fmt: skip
    small = {"model": "tiny", "prompt": "late", "max_tokens": 4, "diffusion": {"steps": 2}}
    received: list = []
    reader = threading.Thread(target=read_stream, args=(server, {**LONG, "stream": True}, received))
    reader.start()
    with httpx.Client(base_url=server.url, timeout=30, headers={"host": "dgserve-1:8000"}) as http:
        assert_openai_error(http.get("/v1/models", headers={"host": "evil.example"}), 403, "forbidden_host")
        wait_for(lambda: metric(http, "dgserve_num_requests_running") == 1, 20, "the request never started")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http.get("/health").status_code == 503, 1, "/health did not turn 503 at once")
        assert http.get("/ready").status_code == 503
        assert time.monotonic() - signalled < 3  # within the announce
        served = http.post("/v1/completions", json=small)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4
        wait_for(lambda: http.post("/v1/completions", json=small).status_code == 503, 4, "new requests still served")
        assert time.monotonic() - signalled >= 3
        assert_openai_error(http.post("/v1/completions", json=small), 503, "not_ready")
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - signalled >= 6  # the stream in flight had the whole drain timeout, then was failed
    reader.join(timeout=10)
    assert received[0] == 200 and received[-1] == "[DONE]" and "error" in json.loads(received[-2])


def test_sigterm_with_zero_drain_timeout_fails_in_flight_requests_and_exits_fast(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "zero.log", "--drain-timeout", "0")
    received: list = []
    reader = threading.Thread(target=read_stream, args=(server, {**LONG, "stream": True}, received))
    reader.start()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        wait_for(lambda: metric(http, "dgserve_num_requests_running") == 1, 20, "the request never started")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    reader.join(timeout=10)
    assert received[0] == 200 and received[-1] == "[DONE]"
    assert "error" in json.loads(received[-2])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_recoverable_fault_fails_the_request_in_flight_and_later_ones_succeed(tiny_checkpoint, tmp_path, stream):
    server = start_server(tiny_checkpoint, tmp_path / "oom.log", launcher=launcher("oom@3"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {**LONG, "max_tokens": 64, "stream": stream}
            if stream:
                lines = [line for line in http.post("/v1/completions", json=body).iter_lines() if line]
                assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2].removeprefix("data: "))
            else:
                assert_openai_error(http.post("/v1/completions", json=body), 500, "generation_failed")
            after = http.post("/v1/completions", json={**LONG, "max_tokens": 8})
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8
            assert http.get("/health").status_code == 200
        assert "(injected by the test)" in server.logs()  # the failure was the launcher's
    finally:
        stop_server(server)


def test_an_unrecoverable_fault_turns_health_to_503(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "fatal.log", launcher=launcher("fatal@2"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            failed = http.post("/v1/completions", json={**LONG, "max_tokens": 64})
            assert failed.status_code in (500, 503)
            wait_for(lambda: http.get("/health").status_code == 503, 5, "/health stayed 200")
            assert http.get("/ready").status_code == 503
            dead = http.post("/v1/completions", json={**LONG, "max_tokens": 8})
            assert_openai_error(dead, 503, "engine_unavailable")
        assert "SystemError: injected fatal fault" in server.logs()
    finally:
        stop_server(server)


def test_a_cancellation_storm_leaves_no_request_behind(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "storm.log", "--max-num-seqs", "4")
    try:

        def impatient(i: int) -> None:
            body = {**LONG, "stream": bool(i % 2), "prompt": f"storm {i}"}
            try:
                with httpx.Client(base_url=server.url, timeout=0.3) as http:
                    http.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                pass  # the client gives up, which is the point

        threads = [threading.Thread(target=impatient, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            wait_for(lambda: metric(http, "dgserve_num_requests_running") == 0
                     and metric(http, "dgserve_num_requests_waiting") == 0, 10, "requests left behind")  # fmt: skip
            assert metric(http, "dgserve_kv_cache_used_bytes") == 0
            started = time.monotonic()
            ok = http.post("/v1/completions", json={**LONG, "max_tokens": 16, "diffusion": {"steps": 4}})
            assert ok.status_code == 200 and time.monotonic() - started < 10
    finally:
        stop_server(server)


def test_host_header_must_be_local_when_bound_to_loopback_and_cors_is_off(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert_openai_error(http.get("/v1/models", headers={"host": "evil.example"}), 403, "forbidden_host")
        assert http.get("/v1/models", headers={"host": "localhost:1234"}).status_code == 200
        assert http.get("/v1/models", headers={"host": "[::1]:80"}).status_code == 200
        plain = http.get("/v1/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in plain.headers
