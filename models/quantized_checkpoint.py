"""Write random checkpoints in the three published quantized formats, with their dequantised bf16 twins
(shared/quantized-formats: the names, dtypes, shapes and config blocks of the real files).

A format's checkpoint is a bf16 random checkpoint (models.random_checkpoint) with its linears quantized as the
published one's are: experts split per expert (`experts.{e}.{gate,up,down}_proj`), the format's tensor names and
dtypes, and its `quantization_config` (plus ModelOpt's hf_quant_config.json). The twin holds the same model with every
quantized weight dequantised by the format's own formula, in the bf16 layout: what a quantized checkpoint must
reproduce token for token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from models.config import model_config_from_dict
from models.loader import DECODER_PREFIX, build_model
from models.quant import (
    QuantExperts,
    QuantLinear,
    dequantize_fp8,
    dequantize_nvfp4,
    plan_from_config,
    quantize_fp8,
    quantize_nvfp4,
)
from models.random_checkpoint import WRITABLE, config_json, generation_config_json, random_tensors, save_shards
from models.tokenizer_files import write_tokenizer

FORMATS = ("fp8", "nvfp4-modelopt", "nvfp4-ct")
EXPERTS = re.compile(r"(model\.decoder\.layers\.\d+\.experts)\.(gate_up_proj|down_proj)")

# RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic's group, field for field.
_FP8_ARGS = {"actorder": None, "block_structure": None, "group_size": None, "num_bits": 8, "observer_kwargs": {},
             "scale_dtype": None, "symmetric": True, "type": "float", "zp_dtype": None}  # fmt: skip
FP8_GROUP = {
    "format": "float-quantized",
    "input_activations": _FP8_ARGS | {"dynamic": True, "observer": None, "strategy": "token"},
    "output_activations": None,
    "targets": ["Linear"],
    "weights": _FP8_ARGS | {"dynamic": False, "observer": "memoryless_minmax", "strategy": "channel"},
}
# compressed-tensors' NVFP4 preset as it serialises it.
_NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
               "scale_dtype": "torch.float8_e4m3fn"}  # fmt: skip
NVFP4_CT_GROUP = {
    "format": "nvfp4-pack-quantized",
    "input_activations": _NVFP4_ARGS | {"dynamic": "local", "observer": "static_minmax"},
    "output_activations": None,
    "targets": ["Linear"],
    "weights": _NVFP4_ARGS | {"dynamic": False},
}
# nvidia/diffusiongemma-26B-A4B-it-NVFP4's config.json block and hf_quant_config.json.
MODELOPT_EXCLUDE = ["lm_head", "*embed_vision*", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*",
                    "*vision_tower*"]  # fmt: skip
_MODELOPT_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.45.0.dev127+ga3a02ca5b.d20260608"}


def _ct_ignore(text: dict[str, Any], also: tuple[str, ...]) -> list[str]:
    """compressed-tensors lists ignored modules by name: routers (encoder and decoder), vision linears, the SC MLP,
    lm_head, and for NVFP4 also attention (`also`)."""
    layers = range(text["num_hidden_layers"])
    vision = ["model.encoder.vision_tower.patch_embedder.input_proj"] + [
        f"model.encoder.vision_tower.encoder.layers.0.{m}.linear"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]  # fmt: skip
    names = [f"model.encoder.language_model.layers.{i}.router.proj" for i in layers] + vision
    for i in layers:
        names.append(f"model.decoder.layers.{i}.router.proj")
        names += [f"model.decoder.layers.{i}.self_attn.{p}_proj" for p in "qkvo" if "self_attn" in also]
    return [*names, *(f"model.decoder.self_conditioning.{p}_proj" for p in ("gate", "up", "down")), "lm_head"]


def quantization_config(fmt: str, text: dict[str, Any]) -> dict[str, Any]:
    """The config.json `quantization_config` block of a format."""
    if fmt == "nvfp4-modelopt":
        group = {"input_activations": _MODELOPT_ARGS, "weights": _MODELOPT_ARGS, "targets": ["Linear"]}
        return {"config_groups": {"group_0": group}, "ignore": MODELOPT_EXCLUDE, "quant_algo": "NVFP4",
                "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}, "producer": MODELOPT_PRODUCER,
                "quant_method": "modelopt"}  # fmt: skip
    group, also = (FP8_GROUP, ()) if fmt == "fp8" else (NVFP4_CT_GROUP, ("self_attn",))
    return {"config_groups": {"group_0": group}, "format": group["format"], "global_compression_ratio": None,
            "ignore": _ct_ignore(text, also), "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": "0.15.1.dev25+gc170de6"}  # fmt: skip


def _split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused experts -> `experts.{e}.{gate,up,down}_proj.weight`, as the quantized checkpoints store them."""
    out = {}
    for key, tensor in tensors.items():
        if not (match := EXPERTS.fullmatch(key)):
            out[key] = tensor
        elif match.group(2) == "down_proj":
            out.update({f"{match.group(1)}.{e}.down_proj.weight": w for e, w in enumerate(tensor)})
        else:
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{match.group(1)}.{e}.gate_proj.weight"], out[f"{match.group(1)}.{e}.up_proj.weight"] = gate, up
    return out


def _fuse_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of _split_experts: the bf16 checkpoint layout."""
    out, prefixes = {}, set()
    for key, tensor in tensors.items():
        if match := re.fullmatch(r"(.*\.experts)\.\d+\.\w+_proj\.weight", key):
            prefixes.add(match.group(1))
        else:
            out[key] = tensor
    for p in prefixes:
        e = range(num_experts)
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{i}.{g}_proj.weight"] for g in ("gate", "up")])
                                                for i in e])  # fmt: skip
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{i}.down_proj.weight"] for i in e])
    return out


def _quantize(fmt: str, module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear's tensors in the format's files, and its dequantised bf16 weight."""
    if fmt == "fp8":
        q, scale = quantize_fp8(weight)
        return {f"{module}.weight": q, f"{module}.weight_scale": scale}, dequantize_fp8(q, scale)
    packed, scale, scale_2 = quantize_nvfp4(weight)
    input_scale = weight.abs().amax().float() / 2688  # a plausible static activation scale; W4A16 never reads it
    if fmt == "nvfp4-modelopt":
        files = {f"{module}.weight": packed, f"{module}.weight_scale": scale,
                 f"{module}.weight_scale_2": scale_2.reshape(()), f"{module}.input_scale": input_scale}  # fmt: skip
        return files, dequantize_nvfp4(packed, scale, scale_2, divisor=False)
    global_scale = 1 / scale_2.reshape(1)
    files = {f"{module}.weight_packed": packed, f"{module}.weight_scale": scale, f"{module}.weight_global_scale":
             global_scale, f"{module}.input_global_scale": 1 / input_scale}  # fmt: skip
    return files, dequantize_nvfp4(packed, scale, global_scale, divisor=True)


def _quantized_modules(cfg: dict[str, Any]) -> set[str]:
    """Checkpoint names of the linears the config's format quantizes, decided as the loader decides them."""
    model = build_model(model_config_from_dict(cfg), torch.bfloat16, plan_from_config(cfg))
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            names.add(DECODER_PREFIX + name)
        elif isinstance(module, QuantExperts):
            experts = range(module.num_experts)
            names.update(f"{DECODER_PREFIX}{name}.{e}.{p}_proj" for e in experts for p in ("gate", "up", "down"))
    return names


def _write(out: Path, cfg: dict[str, Any], size: str, tensors: dict[str, torch.Tensor], num_shards: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_json(size), indent=2) + "\n")
    save_shards({k: t.contiguous() for k, t in sorted(tensors.items())}, out, num_shards)
    write_tokenizer(out, cfg["text_config"]["vocab_size"])
    return out


def write_quantized_checkpoint(
    directory: str | os.PathLike,
    fmt: str,
    size: str = "tiny",
    seed: int = 0,
    num_shards: int = 1,
    twin: str | os.PathLike | None = None,
) -> Path:
    """Write a random checkpoint in `fmt` (and, if `twin` is given, its dequantised bf16 twin there)."""
    if fmt not in FORMATS or size not in WRITABLE:
        raise ValueError(f"unknown format {fmt!r} or size {size!r}; formats {FORMATS}, sizes {WRITABLE}")
    cfg = config_json(size)
    cfg["quantization_config"] = quantization_config(fmt, cfg["text_config"])
    quantized_modules = _quantized_modules(cfg)
    files, dequantised = {}, {}
    for key, tensor in _split_experts(random_tensors(size, seed)).items():
        tensor = tensor.to(torch.bfloat16)
        module = key.removesuffix(".weight")
        if module in quantized_modules:
            quantized, dequantised[key] = _quantize(fmt, module, tensor)
            files.update(quantized)
        else:
            files[key] = dequantised[key] = tensor
    out = _write(Path(directory), cfg, size, files, num_shards)
    if fmt == "nvfp4-modelopt":
        settings = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                    "exclude_modules": MODELOPT_EXCLUDE}  # fmt: skip
        hf_quant = {"producer": MODELOPT_PRODUCER, "quantization": settings}
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
    if twin is not None:
        del cfg["quantization_config"]
        _write(Path(twin), cfg, size, _fuse_experts(dequantised, cfg["text_config"]["num_experts"]), num_shards)
    return out
