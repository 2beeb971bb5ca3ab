"""Load a DiffusionGemma checkpoint (config + safetensors, single file or sharded) into our model (spec 2.3).

Every text tensor is mapped by one rule: `model.decoder.X` is our `X`. The exceptions are the encoder's own
`layer_scalar` buffers (-> `layers.{i}.encoder_layer_scalar`) and the vision tower, which is skipped. A missing,
unexpected or wrongly shaped tensor fails here with its name, never later inside a forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from models.config import GenerationDefaults, ModelConfig, load_config
from models.diffusion_gemma import DiffusionGemma

logger = logging.getLogger(__name__)

DECODER_PREFIX = "model.decoder."
ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar")
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # text-only for now


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config."""


def checkpoint_key_to_param(key: str) -> str | None:
    """Our state-dict name for a checkpoint key; None for tensors we skip; raises for anything unknown."""
    if key.startswith(DECODER_PREFIX):
        return key[len(DECODER_PREFIX) :]
    if match := ENCODER_SCALAR.fullmatch(key):
        return f"layers.{match.group(1)}.encoder_layer_scalar"
    if key.startswith(SKIPPED_PREFIXES):
        return None
    raise CheckpointError(f"unexpected tensor {key!r} in checkpoint")


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's weight files: those listed by model.safetensors.index.json, else model.safetensors."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint_dir / name for name in shards]
    else:
        files = [checkpoint_dir / "model.safetensors"]
    if missing := [str(f) for f in files if not f.is_file()]:
        raise CheckpointError(f"missing weight file(s): {', '.join(missing)}")
    return files


def load_model(
    checkpoint_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    expert_row_alignment: int = 1,
) -> tuple[DiffusionGemma, ModelConfig, GenerationDefaults]:
    """Read config, build the model without initialising it, and fill every parameter from memory-mapped files."""
    directory = Path(checkpoint_dir)
    config, generation = load_config(directory)
    with torch.device("meta"):
        model = DiffusionGemma(config, expert_row_alignment).to(dtype)
    model.to_empty(device=device)
    model.init_constants()  # non-persistent fp32 buffers, not in the checkpoint
    targets = model.state_dict()  # tied tensors appear once: there is one embedding and one text stack
    loaded: set[str] = set()

    files = safetensors_files(directory)
    with tqdm(desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    name = checkpoint_key_to_param(key)
                    bar.update()
                    if name is None:
                        continue
                    if name not in targets:
                        raise CheckpointError(f"unexpected tensor {key!r} in {path.name}")
                    if name in loaded:
                        raise CheckpointError(f"tensor {key!r} appears twice in the checkpoint")
                    tensor = f.get_tensor(key)
                    expected = tuple(targets[name].shape)
                    if tuple(tensor.shape) != expected:
                        raise CheckpointError(
                            f"tensor {key!r} has shape {tuple(tensor.shape)}, config expects {expected}"
                        )
                    targets[name].copy_(tensor)
                    loaded.add(name)
    if missing := sorted(set(targets) - loaded):
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s), e.g. {param_to_checkpoint_key(missing[0])!r}"
        )
    model.eval()
    logger.info("loaded %s: %d tensors from %d file(s), %s on %s", directory, len(loaded), len(files), dtype, device)
    return model, config, generation


def param_to_checkpoint_key(param: str) -> str:
    """The checkpoint key a parameter is loaded from (for error messages and the writer)."""
    if match := re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", param):
        return f"model.encoder.language_model.layers.{match.group(1)}.layer_scalar"
    return DECODER_PREFIX + param
