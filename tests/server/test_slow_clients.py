"""Slow and stalled clients against real `dgserve serve` processes, over raw loopback sockets: the time limits for a
request to arrive, the connection caps, and a stream whose client stops reading."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import socket
import time
from collections.abc import Iterator

import pytest

from engine.request import BlockCommitted, Draft
from server.cli import build_parser
from server.metrics import Metrics
from server.serving import _EventBuffer
from tests.server.conftest import LiveServer, start_server, stop_server

HEADER_LIMIT = KEEP_ALIVE_LIMIT = BODY_LIMIT = 1.0
BODY_RATE = 100_000  # bytes/s: a body declaring 100,000 bytes gets BODY_LIMIT + 1 s
SEND_LIMIT = 3.0
DROPPED = "dgserve_stream_drafts_dropped_total"
CHOICES = 8  # the streaming test's n: as many as run at once (--max-num-seqs 8), eight drafts a step
SLACK = 1.0  # timers fire on an event loop that shares 2 cores with the engine and the tests


@pytest.fixture(scope="module")
def timed(tiny_checkpoint, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server(
        tiny_checkpoint, tmp_path_factory.mktemp("timed") / "server.log",
        "--header-timeout", str(HEADER_LIMIT), "--body-timeout", str(BODY_LIMIT), "--body-min-rate", str(BODY_RATE),
        "--keep-alive-timeout", str(KEEP_ALIVE_LIMIT), "--send-timeout", str(SEND_LIMIT),
        # Small socket and write buffers: a client that stops reading blocks the server's writes within a few KB.
        "--send-buffer", "4096",
    )  # fmt: skip
    yield live
    stop_server(live)


def connect(server: LiveServer, source: str = "127.0.0.1", receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", int(server.url.rpartition(":")[2])))
    return sock


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (a FIN or a reset), and when that was."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic()


def metrics(server: LiveServer) -> dict[str, float]:
    """The samples of /metrics, fetched on a connection of its own (counted in dgserve_open_connections)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rpartition(":")[2]), timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}


def closed_by(limit: str) -> str:
    return f'dgserve_connections_closed_total{{limit="{limit}"}}'


def assert_served_promptly(server: LiveServer) -> None:
    """A normal request, with a body, beside the stalled ones."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rpartition(":")[2]), timeout=10)
    try:
        connection.request("POST", "/tokenize", body=json.dumps({"prompt": "hello"}),
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["count"] > 0
    finally:
        connection.close()
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half"])
def test_stalled_headers_are_cut_off_at_the_header_limit(timed, sent):
    before = metrics(timed)[closed_by("header_timeout")]
    started = time.monotonic()  # the limit runs from the connection's opening
    with connect(timed) as stalled:
        stalled.sendall(sent)
        assert_served_promptly(timed)
        received, closed = until_closed(stalled)
    assert received == b""
    assert HEADER_LIMIT <= closed - started < HEADER_LIMIT + SLACK
    assert metrics(timed)[closed_by("header_timeout")] == before + 1


def test_a_stalled_body_gets_408_within_its_size_scaled_limit(timed):
    before = metrics(timed)[closed_by("body_timeout")]
    with connect(timed) as stalled:
        started = time.monotonic()
        stalled.sendall(post_head("/v1/completions", 100_000) + b'{"model": "tiny", "pro')
        assert_served_promptly(timed)
        received, closed = until_closed(stalled)
    limit = BODY_LIMIT + 100_000 / BODY_RATE
    assert limit <= closed - started < limit + SLACK
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert metrics(timed)[closed_by("body_timeout")] == before + 1


def test_a_slow_body_within_its_limit_is_served(timed):
    body = json.dumps({"prompt": "hello slowly"}).encode()
    with connect(timed) as slow:
        slow.sendall(post_head("/tokenize", len(body)))
        for i in range(0, len(body), len(body) // 3 + 1):
            time.sleep(0.25)
            slow.sendall(body[i : i + len(body) // 3 + 1])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_an_idle_keep_alive_connection_is_closed_after_its_limit(timed):
    before = metrics(timed)[closed_by("keep_alive_timeout")]
    with connect(timed) as idle:
        for _ in range(2):  # idle for less than the limit between requests: still open
            asked = time.monotonic()
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                response += idle.recv(65536)
            assert response.startswith(b"HTTP/1.1 200 ")
            answered = time.monotonic()
            time.sleep(KEEP_ALIVE_LIMIT / 2)
        assert_served_promptly(timed)
        received, closed = until_closed(idle)
    assert received == b""
    assert closed - asked >= KEEP_ALIVE_LIMIT and closed - answered < KEEP_ALIVE_LIMIT + SLACK
    assert metrics(timed)[closed_by("keep_alive_timeout")] == before + 1


def test_a_stream_whose_client_stops_reading_stays_bounded_then_is_cut_off_and_frees_its_slot(timed):
    """Drafts on, eight choices of long canvases (1,024 steps, never confident enough to stop early): nearly every
    event is a draft. The client reads the status line, then nothing; its receive buffer is small."""
    diffusion = {"steps": 1024, "confidence_threshold": 1e-9, "stream_drafts": True}
    body = json.dumps({"model": "tiny", "prompt": "x", "n": CHOICES, "max_tokens": 4000, "ignore_eos": True,
                       "stream": True, "diffusion": diffusion}).encode()  # fmt: skip
    before = metrics(timed)
    with connect(timed, receive_buffer=4096) as reader:
        asked, queued, deadline = time.monotonic(), [], time.monotonic() + 90
        reader.sendall(post_head("/v1/completions", len(body)) + body)
        assert reader.recv(12) == b"HTTP/1.1 200"
        while (sample := metrics(timed))[closed_by("send_timeout")] == before[closed_by("send_timeout")]:
            assert time.monotonic() < deadline, "the stalled stream was never cut off"
            queued.append((time.monotonic(), sample["dgserve_stream_queued_events"]))
            time.sleep(0.05)
        cut = time.monotonic()
        received, _ = until_closed(reader)
    # Once the server's writes block, its sender takes no more events and they wait from then on (a sender merely
    # behind lets some wait for a moment): the unbroken run of samples with events waiting began after the block.
    waiting = list(itertools.takewhile(lambda sample: sample[1] > 0, reversed(queued)))
    assert waiting, "the server's writes never blocked"
    blocked_at = waiting[-1][0]
    assert cut - asked >= SEND_LIMIT and cut - blocked_at < SEND_LIMIT + SLACK
    assert b"[DONE]" not in received  # cut off, not finished: 4,000 tokens at 1,024 steps per 32 take far longer
    settled = time.monotonic() + 5
    while (after := metrics(timed))["dgserve_num_requests_running"] != 0 and time.monotonic() < settled:
        time.sleep(0.05)
    assert after["dgserve_num_requests_running"] == 0 and after["dgserve_stream_queued_events"] == 0
    # What waited for the client: a draft per choice, and a committed block or two at most, however long it stalled.
    assert max(n for _, n in queued) <= CHOICES + 2
    assert after[DROPPED] - before[DROPPED] > 0  # more drafts came than waited (how many: the machine's step rate)
    assert after["dgserve_open_connections"] == 1  # the one reading /metrics
    assert_served_promptly(timed)


def test_past_the_connection_caps_new_clients_get_503_and_the_others_keep_working(tiny_checkpoint, tmp_path):
    """Three connections per client address, four in all: from 127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback)."""
    server = start_server(tiny_checkpoint, tmp_path / "capped.log", "--max-connections", "4",
                          "--max-connections-per-client", "3", "--keep-alive-timeout", "60")  # fmt: skip
    port = int(server.url.rpartition(":")[2])

    def opened(source: str) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))

    def get(connection: http.client.HTTPConnection) -> http.client.HTTPResponse:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response

    def assert_turned_away(source: str) -> None:
        started, connection = time.monotonic(), opened(source)
        response = get(connection)
        connection.close()
        assert response.status == 503 and response.getheader("retry-after") == "1"
        assert time.monotonic() - started < 0.5

    try:
        held = [opened("127.0.0.1") for _ in range(3)]
        assert all(get(c).status == 200 for c in held)
        assert_turned_away("127.0.0.1")  # the per-client cap
        held.append(opened("127.0.0.2"))
        assert get(held[-1]).status == 200
        assert_turned_away("127.0.0.3")  # the cap on all connections
        assert all(get(c).status == 200 for c in held)  # the clients it has keep being served
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 5
        while (status := get(fresh := opened("127.0.0.1")).status) != 200 and time.monotonic() < deadline:
            fresh.close()
            time.sleep(0.05)
        fresh.close()
        assert status == 200  # accepting again
        counts = metrics(server)
        assert counts[closed_by("max_connections_per_client")] >= 1 and counts[closed_by("max_connections")] >= 1
    finally:
        stop_server(server)


def test_drafts_replace_each_other_while_waiting_and_committed_events_are_kept_in_order():
    async def run() -> list:
        buffer = _EventBuffer(Metrics("m"))
        for event in [Draft("r", [1], 1), Draft("r", [2], 2), BlockCommitted("r", [5], 2), Draft("r", [3], 1),
                      Draft("r", [4], 2)]:  # fmt: skip
            buffer.put(0, event)
        buffer.put(1, Draft("s", [9], 1))
        buffer.put(0, None)
        return [await buffer.get() for _ in range(4)]

    got = asyncio.run(run())
    assert [(i, type(e).__name__, e and e.token_ids) for i, e in got] == [
        (0, "BlockCommitted", [5]), (0, "Draft", [4]), (1, "Draft", [9]), (0, "NoneType", None)]  # fmt: skip


def test_every_connection_limit_reads_its_environment_variable(monkeypatch):
    names = ["header_timeout", "body_timeout", "body_min_rate", "keep_alive_timeout", "send_timeout", "send_buffer",
             "max_connections", "max_connections_per_client"]  # fmt: skip
    for name in names:
        monkeypatch.setenv(f"DGSERVE_{name.upper()}", "7")
    args = build_parser().parse_args(["serve"])
    assert [getattr(args, name) for name in names] == [7] * len(names)
