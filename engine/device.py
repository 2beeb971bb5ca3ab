"""Refusing a CUDA device that is not there, and saying why: a CUDA image on a host whose driver is too old or
whose container has no GPU must stop with the cause, not fall back to the CPU and load 100 GB in fp32."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")  # the kernel module's version (Linux, also in containers)


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used."""


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version and where it was read, or None when no driver is visible."""
    try:
        text = DRIVER_VERSION_FILE.read_text()
        if match := re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text):
            return f"{match.group(1)} ({DRIVER_VERSION_FILE})"
    except OSError:
        pass
    if (smi := shutil.which("nvidia-smi")) is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown (nvidia-smi failed: {exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0:
        return f"unknown (nvidia-smi failed: {lines[0] if lines else f'exit status {done.returncode}'})"
    return f"{lines[0].strip()} (nvidia-smi)" if lines else None


def no_cuda_reason() -> str:
    """Why torch sees no CUDA GPU, as far as can be told from here, and what to check."""
    cuda = torch.version.cuda
    build = f"torch {torch.__version__} built for CUDA {cuda}" if cuda else f"torch {torch.__version__} without CUDA"
    driver = nvidia_driver_version()
    found = f"NVIDIA driver {driver}" if driver else f"no NVIDIA driver found (no {DRIVER_VERSION_FILE}, no nvidia-smi)"
    needs = f"a driver for CUDA {cuda} or newer" if cuda else "a CUDA build of torch"
    return (f"torch.cuda.is_available() is False ({build}; {found}). Run `nvidia-smi` on the host: it must list the "
            f"GPU, and this build needs {needs}. In a container, install the NVIDIA Container Toolkit on the host and "
            f"start the container with `--gpus all` (docker-compose.yml reserves the GPU itself).")  # fmt: skip


def check_device(device: torch.device, requested: bool) -> None:
    """Refuse a CUDA device that torch cannot use, with the driver found and what to check. A CUDA build of torch
    that chose the CPU by itself (`requested` False) says why, loudly."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {device} was asked for (--device, DGSERVE_DEVICE) but no CUDA GPU is "
                                     f"usable: {no_cuda_reason()}")  # fmt: skip
    if device.type == "cpu" and not requested and torch.version.cuda:
        logger.warning("no usable CUDA GPU, so the CPU runs the model: %s", no_cuda_reason())
