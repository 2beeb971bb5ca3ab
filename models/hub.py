"""Where a checkpoint comes from: a local directory, the bundled demo (a tiny model trained on the Python manual), the
random-weight demo (written on first use), or a Hugging Face hub id found in (or fetched into) the usual Hugging Face
cache."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from models.random_checkpoint import write_random_checkpoint

logger = logging.getLogger(__name__)

DEMO, RANDOM_DEMO = "demo", "random-demo"
DEMO_CHECKPOINT = Path(__file__).parent / "demo"  # trained by tools/train_demo.py; ships with the package


def cache_dir() -> Path:
    return Path(os.environ.get("DGSERVE_CACHE", Path.home() / ".cache" / "dgserve"))


def random_demo_checkpoint() -> Path:
    """The random-weight demo checkpoint, written once into the cache directory and reused. Its canvases never
    settle, so every one runs all its steps: what load tests and benchmarks want."""
    path = cache_dir() / "random-demo-checkpoint"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
        write_random_checkpoint(staging, "demo", seed=0)
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)  # atomic: a concurrent start never sees half a checkpoint
        logger.info("wrote the random-weight demo checkpoint to %s", path)
    return path


def resolve_checkpoint(model: str | None) -> Path:
    """A directory holding config.json for `model`: "demo" or None, "random-demo", a local path, or a hub id."""
    if model in (None, DEMO):
        return DEMO_CHECKPOINT
    if model == RANDOM_DEMO:
        return random_demo_checkpoint()
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
