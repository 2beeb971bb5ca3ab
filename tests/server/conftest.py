"""Starting and stopping real `dgserve serve` processes on loopback (the fixtures are in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

API_KEY = "test-key-123"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def logs(self) -> str:
        return self.log.read_text()

    def sse_events(self, path: str, body: dict) -> list[tuple[str, dict]]:
        """A streamed POST's events as (the SSE `event:` name, the JSON data), in order."""
        with self.http() as http, http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            events, name = [], None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: Path,
    log: Path,
    *args: str,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
    launcher: tuple[str, ...] = ("-m", "server"),  # or a script that patches torch before it runs the server
) -> LiveServer:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if api_key:
        env["DGSERVE_API_KEY"] = api_key
    command = [sys.executable, *launcher, "serve", "--model", str(checkpoint), "--port", str(port),
               "--served-model-name", "tiny", "--kv-budget-bytes", str(256 * 2**20), *args]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log, api_key)
    wait_ready(process, f"{server.url}/ready", 120, log)
    return server


def wait_ready(process: subprocess.Popen, url: str, seconds: float, log: Path) -> None:
    """Until `url` answers 200; a process that exits or stays unready that long is killed and its log raised."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{url} not ready (exit code {process.poll()}):\n{log.read_text()}")


def stop_server(server: LiveServer) -> None:
    server.process.send_signal(signal.SIGINT)  # as Ctrl-C: no drain announce (SIGTERM's) for routers to see
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
