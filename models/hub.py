"""Where a checkpoint comes from: a local directory, the bundled demo (random weights, written on first use), or a
Hugging Face hub id found in (or fetched into) the usual Hugging Face cache."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from models.random_checkpoint import write_random_checkpoint

logger = logging.getLogger(__name__)

DEMO = "demo"


def cache_dir() -> Path:
    return Path(os.environ.get("DGSERVE_CACHE", Path.home() / ".cache" / "dgserve"))


def demo_checkpoint() -> Path:
    """The demo checkpoint, written once into the cache directory and reused."""
    path = cache_dir() / "demo-checkpoint"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
        write_random_checkpoint(staging, "demo", seed=0)
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)  # atomic: a concurrent start never sees half a checkpoint
        logger.info("wrote the demo checkpoint to %s", path)
    return path


def resolve_checkpoint(model: str | None) -> Path:
    """A directory holding config.json for `model`: "demo" or None, a local path, or a hub id."""
    if model in (None, DEMO):
        return demo_checkpoint()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{model}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as exc:  # hub errors come in many types; the user needs the id and the cause
        raise FileNotFoundError(f"{model}: not a local directory and not available from the Hugging Face hub "
                                f"or its cache ({type(exc).__name__}: {exc})") from exc  # fmt: skip
