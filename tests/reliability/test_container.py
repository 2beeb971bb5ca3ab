"""The image's promises, kept by the server the image runs: real `dgserve serve` processes started with the image's
environment (read from the Dockerfile) answer only allowed Host names though bound to 0.0.0.0, tell the health check
the port they bound, and end every stream with an error event and [DONE] when stopped as `docker stop` stops
README's `docker run`. A CUDA image without a GPU, and a CPU load too big for memory, are refused with the reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from engine.device import DRIVER_VERSION_FILE
from engine.memory import _mem_available
from models.random_checkpoint import config_json
from server.cli import main
from tests.reliability.test_lifecycle import LONG, metric, read_stream, wait_for
from tests.server.conftest import LiveServer, start_server, stop_server
from tests.server.test_errors_and_endpoints import assert_openai_error
from tests.test_deploy import DOCKERFILE, dockerfile_instructions, flags, readme_docker_runs, variant_images

ALLOWED = "gpu-box.lan,192.168.1.20"  # what an operator publishing beyond loopback adds


def container_env(url_file: Path) -> dict[str, str]:
    """The DGSERVE_ variables the CPU image sets (the ones that do not name the model), and an allow-list."""
    image = variant_images()["cpu"]
    env = {k: v for k, v in image.items() if k.startswith("DGSERVE_") and k not in ("DGSERVE_MODEL", "DGSERVE_CACHE")}
    assert env["DGSERVE_HOST"] == "0.0.0.0"
    return env | {"DGSERVE_URL_FILE": str(url_file), "DGSERVE_ALLOWED_HOSTS": ALLOWED}


@pytest.fixture(scope="module")
def container(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Started as the image starts it, but with `--port` (start_server's): the image's DGSERVE_PORT says 8000.
    One process for the module (a start costs 15-20 s on a busy 2-core machine); the `docker stop` test ends it."""
    directory = tmp_path_factory.mktemp("container")
    live = start_server(tiny_checkpoint, directory / "container.log", env=container_env(directory / "url"))
    yield live
    stop_server(live)


def url_file(server: LiveServer) -> Path:
    return server.log.parent / "url"


def health_probe(url_file: Path) -> int:
    """The image's HEALTHCHECK command, run as Docker runs it (with the image's environment)."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    _, command = flags(next(a for k, a in instructions if k == "HEALTHCHECK"))
    probe = json.loads(command.removeprefix("CMD").strip())
    env = {"DGSERVE_URL_FILE": str(url_file), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True, timeout=30).returncode


def test_bound_to_all_interfaces_the_host_check_holds_and_the_health_check_follows_the_port(container):
    with httpx.Client(base_url=container.url, timeout=10) as http:
        for foreign in ("evil.example", "evil.example:8000", "localhost.evil.example"):
            refused = http.get("/v1/models", headers={"host": foreign})
            assert_openai_error(refused, 403, "forbidden_host")
            assert "DGSERVE_ALLOWED_HOSTS" in refused.json()["error"]["message"]
        for allowed in ("gpu-box.lan:8000", "192.168.1.20", "GPU-box.LAN", "localhost:8000", "127.0.0.1", "[::1]:80"):
            assert http.get("/v1/models", headers={"host": allowed}).status_code == 200, allowed
    assert [m.id for m in container.client().models.list()] == ["tiny"]  # the official client, by 127.0.0.1

    assert url_file(container).read_text().strip() == container.url  # the port bound, not the image's 8000
    assert not container.url.endswith(":8000")
    assert health_probe(url_file(container)) == 0
    assert f"serving on {container.url}/v1" in container.logs() and "http://0.0.0.0" not in container.logs()


def test_docker_stop_after_readmes_docker_run_ends_every_stream_with_an_error_and_done(container):
    """SIGTERM, then SIGKILL once the grace of README's plain `docker run` is over: the drain must end first.
    It stops the module's server, so it comes after the other test that uses it."""
    grace, drain = min(readme_docker_runs())
    assert float(container_env(url_file(container))["DGSERVE_DRAIN_TIMEOUT"]) == drain
    streams: list[list] = [[], []]
    readers = [threading.Thread(target=read_stream, args=(container, {**LONG, "stream": True}, s)) for s in streams]
    for reader in readers:
        reader.start()
    with httpx.Client(base_url=container.url, timeout=10) as http:
        wait_for(lambda: metric(http, "dgserve_num_requests_running") == len(streams), 20, "the requests never ran")
    stopped = time.monotonic()
    container.process.send_signal(signal.SIGTERM)
    try:
        code = container.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        container.process.send_signal(signal.SIGKILL)
        pytest.fail(f"still running {grace:.0f} s after SIGTERM: Docker would SIGKILL it and cut the streams")
    assert code == 0 and time.monotonic() - stopped >= drain - 0.5  # it drained, then exited by itself
    for reader, received in zip(readers, streams, strict=True):
        reader.join(timeout=10)
        assert received[0] == 200 and received[-1] == "[DONE]"
        assert "error" in json.loads(received[-2]), received[-2]
    assert health_probe(url_file(container)) != 0  # the probe fails once the server is gone


def test_a_cuda_image_without_a_gpu_refuses_to_start_naming_the_driver_and_what_to_check(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a usable GPU is here")
    for name, value in variant_images()["cuda12"].items():
        if name.startswith("DGSERVE_"):
            monkeypatch.setenv(name, value)  # DGSERVE_MODEL is the hub id: refused before any download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = tmp_path / "bin" / "nvidia-smi"  # a host whose driver is too old for the image still has nvidia-smi
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 565.57.01\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    with pytest.raises(SystemExit) as refused:
        main(["serve"])
    message = str(refused.value.code)  # a string: Python prints it and exits with status 1
    assert message.startswith("dgserve serve: device cuda was asked for")
    # The kernel module's own record comes first where there is one (a GPU host running a CPU torch).
    found = f"({DRIVER_VERSION_FILE})" if DRIVER_VERSION_FILE.exists() else "565.57.01 (nvidia-smi)"
    assert found in message and "`nvidia-smi`" in message and "NVIDIA Container Toolkit" in message


def test_a_cpu_load_too_big_for_memory_is_refused_with_the_numbers_before_any_weight_is_read(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_json("real")))  # the real shapes, and no weight file
    monkeypatch.delenv("DGSERVE_DEVICE", raising=False)
    if torch.cuda.is_available() or _mem_available() > 200 * 2**30:
        pytest.skip("the real model would fit here")
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--model", str(tmp_path), "--port", "0"])
    message = str(refused.value.code)
    assert "the model does not fit in CPU memory: float32 weights 94.07 GiB + KV" in message
    assert "GiB free" in message and "no CUDA GPU is usable" in message
