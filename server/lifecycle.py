"""Readiness and graceful shutdown: on SIGTERM/SIGINT, /ready turns 503 and new requests are refused at once, the
requests in flight get up to the drain timeout to finish, what is left then ends with an error, and the process
exits. A second signal exits at once."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import uvicorn

from engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class ServerState:
    """What /ready and the request handlers consult."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


def local_url(host: str, port: int) -> str:
    """A URL a user on this machine can open: a wildcard bind address is no host to connect to."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, engine: AsyncEngine, drain_timeout: float,
                 url_file: str | None = None) -> None:  # fmt: skip
        super().__init__(config)
        self.state, self.engine, self.drain_timeout, self.url_file = state, engine, drain_timeout, url_file

    def _log_started_message(self, listeners: list[socket.socket]) -> None:
        """Silent: dgserve's own line names a URL to open, where uvicorn's names the bind address (0.0.0.0)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.url_file and self.servers and not self.should_exit:
            # The port actually bound, so a health check follows `--port` (and port 0) without being told.
            port = self.servers[0].sockets[0].getsockname()[1]
            Path(self.url_file).write_text(local_url(self.config.host, port) + "\n")

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.state.draining or not self.state.started:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        logger.info("shutting down: draining %d request(s) for up to %.0f s", self.engine.num_in_flight,
                    self.drain_timeout)  # fmt: skip
        loop = asyncio.get_running_loop()  # a signal handler runs on the loop's thread, between its callbacks
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_in_flight:
            logger.warning("drain timeout: failing %d request(s) still in flight", self.engine.num_in_flight)
        # Fails what is left (an error event, then [DONE]) and stops the engine thread.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, 10.0)
        await asyncio.sleep(0.1)  # let the handlers write their last bytes
        self.should_exit = True
