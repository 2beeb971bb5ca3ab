"""Readiness and graceful shutdown. On SIGTERM, /health and /ready turn 503 at once, so that routers and load
balancers stop sending here, while new requests are still served for the drain announce; then new requests are
refused, what is in flight gets until the drain timeout (counted from the signal) to finish, what is left then ends
with an error, and the process exits. SIGINT (Ctrl-C at a terminal) skips the announce. A second signal exits at
once."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path

import uvicorn

from engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class ServerState:
    """What /health, /ready and the request handlers consult."""

    def __init__(self) -> None:
        self.started = False
        self.stopping = False  # a signal came: /health and /ready answer 503
        self.draining = False  # the announce is over: new requests are refused

    @property
    def ready(self) -> bool:
        return self.started and not self.stopping

    @property
    def accepting(self) -> bool:
        return self.started and not self.draining


def local_url(host: str, port: int) -> str:
    """A URL a user on this machine can open: a wildcard bind address is no host to connect to."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, engine: AsyncEngine, drain_timeout: float,
                 drain_announce: float = 0.0, url_file: str | None = None) -> None:  # fmt: skip
        super().__init__(config)
        self.state, self.engine, self.url_file = state, engine, url_file
        self.drain_timeout, self.drain_announce = drain_timeout, drain_announce

    def _log_started_message(self, listeners: list[socket.socket]) -> None:
        """Silent: dgserve's own line names a URL to open, where uvicorn's names the bind address (0.0.0.0)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.url_file and self.servers and not self.should_exit:
            # The port actually bound, so a health check follows `--port` (and port 0) without being told.
            port = self.servers[0].sockets[0].getsockname()[1]
            Path(self.url_file).write_text(local_url(self.config.host, port) + "\n")

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.state.stopping or not self.state.started:
            return super().handle_exit(sig, frame)
        self.state.stopping = True
        # The deadline counts from the signal, so a stop grace that covers the drain timeout covers the announce too.
        deadline = time.monotonic() + self.drain_timeout
        announce = min(self.drain_announce, self.drain_timeout) if sig == signal.SIGTERM else 0.0
        logger.info("shutting down: /health and /ready answer 503; new requests are served for %.0f s more, and "
                    "requests in flight get up to %.0f s in all", announce, self.drain_timeout)  # fmt: skip
        loop = asyncio.get_running_loop()  # a signal handler runs on the loop's thread, between its callbacks
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(announce, deadline)))

    async def _drain(self, announce: float, deadline: float) -> None:
        await asyncio.sleep(announce)
        self.state.draining = True
        logger.info("draining %d request(s); new requests get 503", self.engine.num_in_flight)
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_in_flight:
            logger.warning("drain timeout: failing %d request(s) still in flight", self.engine.num_in_flight)
        # Fails what is left (an error event, then [DONE]) and stops the engine thread.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, 10.0)
        await asyncio.sleep(0.1)  # let the handlers write their last bytes
        self.should_exit = True
