"""Load a DiffusionGemma checkpoint (config + safetensors, single file or sharded) into our model (spec 2.3).

Every text tensor is mapped by one rule: `model.decoder.X` is our `X`. The exceptions are the encoder's own
`layer_scalar` buffers (-> `layers.{i}.encoder_layer_scalar`), the vision tower, which is skipped, and quantized
modules, whose files' tensors models.quant maps (FP8 and NVFP4 checkpoints store experts split per expert). A
missing, unexpected, wrongly shaped or wrongly typed tensor fails here with its name, never later inside a forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from models.config import ConfigError, GenerationDefaults, ModelConfig, load_config
from models.diffusion_gemma import DiffusionGemma, Experts
from models.gemm_path import expert_path, linear_path
from models.quant import (
    QuantExperts,
    QuantLinear,
    QuantPlan,
    TensorSpec,
    apply_plan,
    load_time_plan,
    plan_from_config,
    quantized_specs,
)

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


def checkpoint_plan(checkpoint_dir: str | os.PathLike, quantization: str | None = None) -> QuantPlan | None:
    """The checkpoint's own quantized format (config.json's quantization_config), or `quantization` of a bf16 one."""
    plan = plan_from_config(json.loads((Path(checkpoint_dir) / "config.json").read_text()))
    if quantization is None:
        return plan
    if plan is not None:
        raise ConfigError(f"the checkpoint is already quantized ({plan.format}); --quantization is for bf16 ones")
    return load_time_plan(quantization)


def build_model(
    config: ModelConfig, dtype: torch.dtype, plan: QuantPlan | None, expert_row_alignment: int = 1
) -> DiffusionGemma:
    """The model on the meta device, with the plan's modules quantized: shapes and dtypes, no memory."""
    with torch.device("meta"):
        model = DiffusionGemma(config, expert_row_alignment).to(dtype)
        if plan is not None:
            apply_plan(model, plan, DECODER_PREFIX)
    return model


def tensor_specs(model: DiffusionGemma, plan: QuantPlan | None) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must hold, by its key: shape, dtype and where it is loaded."""
    specs: dict[str, TensorSpec] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    for name, module in quantized.items():
        specs.update(quantized_specs(name, module, plan, DECODER_PREFIX))
    quantized_prefixes = tuple(f"{name}." for name in quantized)
    for name, target in model.state_dict().items():  # tied tensors appear once: one embedding, one text stack
        if not name.startswith(quantized_prefixes):
            specs[param_to_checkpoint_key(name)] = TensorSpec(tuple(target.shape), None, target.copy_)
    return specs


def _check(key: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
    if spec.dtype is None and not (tensor.is_floating_point() and tensor.element_size() > 1):
        raise CheckpointError(f"tensor {key!r} is {tensor.dtype}, expected a bf16/fp16/fp32 weight")
    if spec.dtype is not None and tensor.dtype != spec.dtype:
        raise CheckpointError(f"tensor {key!r} is {tensor.dtype}, the format stores {spec.dtype}")
    if tuple(tensor.shape) != spec.shape:
        raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, config expects {spec.shape}")


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """safe_open, with a truncated or corrupt file reported by name."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as exc:
        raise CheckpointError(f"{path.name} cannot be read (truncated or corrupt?): {exc}") from None


def load_model(
    checkpoint_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    expert_row_alignment: int = 1,
    quantization: str | None = None,
    device_class: str | None = None,
) -> tuple[DiffusionGemma, ModelConfig, GenerationDefaults]:
    """Read config, build the model without initialising it, and fill every tensor from memory-mapped files, one at a
    time: a quantized checkpoint stays quantized, and `quantization` ("fp8", "nvfp4") quantizes a bf16 one tensor by
    tensor on the device, so the bf16 model never exists there whole. `device_class` (e.g. "sm89") chooses the
    kernels that GPU class would run (models.gemm_path): for analysis and the Triton kernels' CPU tests."""
    directory = Path(checkpoint_dir)
    config, generation = load_config(directory)
    plan = checkpoint_plan(directory, quantization)
    model = build_model(config, dtype, plan, expert_row_alignment)
    model.to_empty(device=device)
    model.init_constants()  # non-persistent fp32 buffers, not in the checkpoint
    specs = tensor_specs(model, plan)
    loaded: set[str] = set()

    files = safetensors_files(directory)
    with tqdm(desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            with _open(path) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    bar.update()
                    if checkpoint_key_to_param(key) is None:
                        continue
                    if key not in specs:
                        raise CheckpointError(f"unexpected tensor {key!r} in {path.name}")
                    if key in loaded:
                        raise CheckpointError(f"tensor {key!r} appears twice in the checkpoint")
                    tensor = f.get_tensor(key)
                    _check(key, tensor, specs[key])
                    specs[key].load(tensor)
                    loaded.add(key)
    if missing := sorted(set(specs) - loaded):
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    model.eval()
    choose_kernels(model, torch.device(device), dtype, device_class)
    fmt = plan.format if plan else str(dtype).removeprefix("torch.")
    logger.info("loaded %s: %d tensors from %d file(s), %s on %s", directory, len(loaded), len(files), fmt, device)
    return model, config, generation


def choose_kernels(
    model: DiffusionGemma, device: torch.device, dtype: torch.dtype, device_class: str | None = None
) -> None:
    """Fix each expert module's and quantized linear's GEMM for this device (models.gemm_path), and log the choice."""
    chosen: set[str] = set()
    for module in model.modules():
        if isinstance(module, Experts):
            scheme = getattr(module, "scheme", None)
            path = expert_path(device, dtype, scheme, device_class)
            module.set_path(path)
            chosen.add(f"{path}" + (f" ({scheme} weights, dequantised exactly)" if path.weights == "dense" and scheme
                                     else ""))  # fmt: skip
        elif isinstance(module, QuantLinear):
            module.path = linear_path(device, module.scheme, device_class)
            chosen.add(f"quantized linears: {module.path} {module.scheme}")
    for line in sorted(chosen):
        logger.info(line)


def param_to_checkpoint_key(param: str) -> str:
    """The checkpoint key a parameter is loaded from (for error messages and the writer)."""
    if match := re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", param):
        return f"model.encoder.language_model.layers.{match.group(1)}.layer_scalar"
    return DECODER_PREFIX + param
