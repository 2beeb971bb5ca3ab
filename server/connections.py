"""Connection limits under the ASGI app, in uvicorn's h11 protocol: how long a request may take to arrive, how many
connections may be open, and how long a client may leave the server's writes blocked.

uvicorn alone times out only idle keep-alive connections (and any byte resets that timer), and its concurrency cap
answers 503 only after reading a request: a client that sends part of a request and stops, or stops reading a
stream, would hold its socket, task and buffers for as long as it likes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from server.errors import error_body
from server.metrics import Metrics

_LINGER = 2.0  # seconds a refused client gets to read its 503 and hang up
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The `dgserve serve` options of the same names (seconds, bytes)."""

    header_timeout: float = 5.0  # request headers, from the connection's opening or the next request's first byte
    body_timeout: float = 10.0  # the whole body, plus 1 s per body_min_rate bytes of its declared size
    body_min_rate: int = 64 * 2**10
    keep_alive_timeout: float = 5.0  # idle between requests
    send_timeout: float = 30.0  # writes blocked by a client that does not read
    # What may wait to be sent per connection, in the kernel's socket buffer and again in the server's write buffer,
    # before writes block: without it the kernel grows a socket's buffer to megabytes for a client that stalls.
    send_buffer: int = 128 * 2**10
    max_connections: int = 512
    max_connections_per_client: int = 128  # per client IP address; 0: no such cap
    max_body_bytes: int = 8 * 2**20  # a chunked body has no declared size: it gets the time of the largest allowed

    def body_seconds(self, declared: int | None) -> float:
        """How long a body declaring this Content-Length (None: chunked) may take to arrive."""
        size = self.max_body_bytes if declared is None else min(declared, self.max_body_bytes)  # larger: a 413
        return self.body_timeout + size / self.body_min_rate


def _response(status: int, message: str, code: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 error response, written straight to the transport (there may be no request to answer)."""
    body = json.dumps(error_body(status, message, code)).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *headers]  # fmt: skip
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


class ConnectionGuard:
    """What every connection shares: the limits, open connections per client address, the metrics. Pass
    `guard.protocol` as uvicorn's `http`: it builds each accepted connection's protocol."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics) -> None:
        self.limits, self.metrics = limits, metrics
        self.per_client: Counter[str] = Counter()
        self.busy = _response(503, "too many open connections; retry shortly", "too_many_connections",
                              "retry-after: 1")  # fmt: skip
        self.body_late = _response(408, "the request body did not arrive in time", "request_timeout")

    def protocol(self, **kwargs: Any) -> GuardedH11Protocol:
        return GuardedH11Protocol(guard=self, **kwargs)


class _Refused(asyncio.Protocol):
    """A refused connection once its 503 is written: reads and drops the client's request until it hangs up (for
    `_LINGER` s at most). Closing with the request unread would reset the connection, and a reset can discard the
    503 before the client reads it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard
        self.timeout_keep_alive = guard.limits.keep_alive_timeout
        self._address = ""
        self._phase: str | None = None  # the arrival deadline running: "header_timeout" or "body_timeout"
        self._deadline: asyncio.TimerHandle | None = None
        self._write_stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        limits, metrics = self.guard.limits, self.guard.metrics
        peer = get_remote_addr(transport)
        self._address = peer[0] if peer else ""
        # Refused at accept, before anything is read or allocated, so the clients already in keep being served.
        if len(self.connections) >= limits.max_connections:
            refused = "max_connections"
        elif 0 < limits.max_connections_per_client <= self.guard.per_client[self._address]:
            refused = "max_connections_per_client"
        else:
            super().connection_made(transport)
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer)
            transport.set_write_buffer_limits(high=limits.send_buffer)
            self.guard.per_client[self._address] += 1
            metrics.open_connections.inc()
            self._arm("header_timeout", limits.header_timeout)
            return
        metrics.connections_closed.labels(limit=refused).inc()
        transport.write(self.guard.busy)
        transport.set_protocol(_Refused(transport))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._arm(None, 0)
        if self._write_stall is not None:
            self._write_stall.cancel()
        self.guard.per_client[self._address] -= 1
        if not self.guard.per_client[self._address]:
            del self.guard.per_client[self._address]
        self.guard.metrics.open_connections.dec()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Run the deadline for how far the request has come: the headers once a byte of them is in, then the body;
        none once it is all in (the keep-alive timer covers the idle time between requests)."""
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.trailing_data[0]:
            phase = "header_timeout"
        elif state is h11.SEND_BODY:
            phase = "body_timeout"
        else:
            phase = None
        if phase == self._phase:
            return
        if phase == "header_timeout":
            self._arm(phase, self.guard.limits.header_timeout)
        elif phase == "body_timeout":
            declared = next((int(value) for name, value in self.headers if name == b"content-length"), None)
            self._arm(phase, self.guard.limits.body_seconds(declared))
        else:
            self._arm(None, 0)

    def _arm(self, phase: str | None, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = phase
        self._deadline = None if phase is None else self.loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._phase = self._deadline = None
        self.guard.metrics.connections_closed.labels(limit=phase).inc()
        cycle = self.cycle
        if phase == "body_timeout" and cycle is not None and not cycle.response_started:
            # The app is waiting for the body: it sees a disconnect, and nothing it sends after this goes out.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(self.guard.body_late)
            self.transport.close()
        else:
            self.transport.abort()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.guard.metrics.connections_closed.labels(limit="keep_alive_timeout").inc()
        super().timeout_keep_alive_handler()

    # The transport calls these when its write buffer passes the high-water mark and when it drains again. Writes
    # blocked for send_timeout mean the client has stopped reading: cut it off as a disconnect would, which also
    # ends its stream and frees its engine slot.
    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_stall = self.loop.call_later(self.guard.limits.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _stalled(self) -> None:
        self._write_stall = None
        self.guard.metrics.connections_closed.labels(limit="send_timeout").inc()
        # Linger 0: the kernel resets the connection and frees its send buffer now, instead of keeping the orphaned
        # socket and its unsent bytes while it probes a client that reads nothing.
        self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.transport.abort()
