"""Write a randomly initialised DiffusionGemma checkpoint in the real on-disk format (spec 2.3, 9).

config.json with `per_layer_config`, generation_config.json, safetensors under the real key names (optionally
sharded with an index), and offline tokenizer files. Deterministic from a seed. The names below are the sizes the
project uses: `tiny` for parity tests, `demo` for `dgserve serve` without weights, `bench` for benchmarks, and
`structure` for the real model's layer pattern, experts and head geometry at a tiny width.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.config import GenerationDefaults, ModelConfig, generation_defaults_from_dict, model_config_from_dict
from models.diffusion_gemma import DiffusionGemma
from models.loader import DECODER_PREFIX, choose_kernels, param_to_checkpoint_key
from models.quant import QuantizedWeight, apply_plan, load_time_plan
from models.tokenizer_files import write_tokenizer

S, F = "sliding_attention", "full_attention"

# HF text_config fields per size; everything else takes the real model's values.
SIZES: dict[str, dict[str, Any]] = {
    # spec 9.1: every path (sliding/full, K=V, proportional RoPE, MoE, window crossing) in a 0.5 M-param model
    "tiny": dict(
        vocab_size=2048, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        top_k_experts=2, num_hidden_layers=4, layer_types=[S, F, S, F], num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=16,
        max_position_embeddings=4096, canvas_length=32, max_denoising_steps=8, max_new_tokens=64,
    ),
    # a 256-token reply in a few seconds on 2 CPU cores; a small vocabulary so random text is mostly real pieces
    "demo": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
        top_k_experts=2, num_hidden_layers=6, layer_types=[S, S, S, S, S, F], num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=1024,
        max_position_embeddings=32768, canvas_length=256, max_denoising_steps=48, max_new_tokens=256,
    ),
    # spec 12: the real vocabulary and small everything else, for sampler and engine benchmarks
    "bench": dict(
        vocab_size=262144, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
        top_k_experts=4, num_hidden_layers=6, layer_types=[S, S, S, S, S, F], num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=1024,
        max_position_embeddings=32768, canvas_length=256, max_denoising_steps=48, max_new_tokens=256,
    ),
    # the real model's structure (spec 1: 30 layers 5:1, 128 experts top-8, 16 heads, KV 8/2, head dims 256/512,
    # window 1024, the real vocabulary) at a tiny width: where loader and parity bugs of the real checkpoint show
    "structure": dict(
        vocab_size=262144, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=128,
        top_k_experts=8, num_hidden_layers=30, layer_types=[S, S, S, S, S, F] * 5, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
        max_position_embeddings=131072, canvas_length=256, max_denoising_steps=48, max_new_tokens=256,
    ),
    # the real google/diffusiongemma-26B-A4B-it text stack (spec 1), 25.25 B parameters: built on a device by
    # random_model for benchmarks, never written (50 GB)
    "real": dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
        top_k_experts=8, num_hidden_layers=30, layer_types=[S, S, S, S, S, F] * 5, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
        max_position_embeddings=262144, canvas_length=256, max_denoising_steps=48, max_new_tokens=256,
    ),
}  # fmt: skip
WRITABLE = sorted(set(SIZES) - {"real"})

# A minimal Gemma 4 vision tower: text-only serving skips it, but the real format carries one.
VISION_CONFIG: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "head_dim": 8, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 16, "initializer_range": 0.02, "intermediate_size": 32, "max_position_embeddings": 131072,
    "model_type": "gemma4_vision", "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 2,
    "patch_size": 4, "pooling_kernel_size": 1, "position_embedding_size": 64, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"}, "standardize": False,
    "use_clipped_linears": False,
}  # fmt: skip


def _vision_shapes(text_hidden: int) -> dict[str, tuple[int, ...]]:
    v, mlp, head = VISION_CONFIG["hidden_size"], VISION_CONFIG["intermediate_size"], VISION_CONFIG["head_dim"]
    patch = VISION_CONFIG["patch_size"]
    tower = "model.encoder.vision_tower."
    shapes = {
        tower + "patch_embedder.input_proj.weight": (v, 3 * patch * patch),
        tower + "patch_embedder.position_embedding_table": (2, VISION_CONFIG["position_embedding_size"], v),
        "model.encoder.embed_vision.embedding_projection.weight": (text_hidden, v),
    }
    for i in range(VISION_CONFIG["num_hidden_layers"]):
        layer = f"{tower}encoder.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):  # fmt: skip
            shapes[f"{layer}{norm}.weight"] = (v,)
        for proj in "qkvo":
            shapes[f"{layer}self_attn.{proj}_proj.linear.weight"] = (v, v)
        shapes[f"{layer}self_attn.q_norm.weight"] = shapes[f"{layer}self_attn.k_norm.weight"] = (head,)
        shapes[f"{layer}mlp.gate_proj.linear.weight"] = shapes[f"{layer}mlp.up_proj.linear.weight"] = (mlp, v)
        shapes[f"{layer}mlp.down_proj.linear.weight"] = (v, mlp)
    return shapes


def config_json(size: str) -> dict[str, Any]:
    """The config.json that save_pretrained writes for this size (per_layer_config form)."""
    text = copy.deepcopy(SIZES[size])
    vocab = text["vocab_size"]
    canvas_length = text.pop("canvas_length")
    for key in ("max_denoising_steps", "max_new_tokens"):
        text.pop(key)
    head_dim, kv_heads = text.pop("global_head_dim"), text.pop("num_global_key_value_heads")
    full_layers = [i for i, layer_type in enumerate(text["layer_types"]) if layer_type == F]
    width = len(str(max(full_layers)))  # save_pretrained zero-pads keys to the widest index: "05", ..., "29"
    text["per_layer_config"] = {
        str(i).zfill(width): {"head_dim": head_dim, "num_key_value_heads": kv_heads} for i in full_layers
    }
    text.update(
        attention_bias=False, attention_dropout=0.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
        model_type="diffusion_gemma_text", rms_norm_eps=1e-06, tie_word_embeddings=True,
        use_bidirectional_attention="vision",
        rope_parameters={
            F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            S: {"rope_theta": 10000.0, "rope_type": "default"},
        },
    )  # fmt: skip
    big = vocab > 258882  # the real image token ids fit only in the real vocabulary
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "boi_token_id": 255999 if big else vocab - 3,
        "eoi_token_id": 258882 if big else vocab - 2,
        "image_token_id": 258880 if big else vocab - 1,
        "canvas_length": canvas_length,
        "dtype": "bfloat16",
        "eos_token_id": [1, 106, 50],
        "initializer_range": 0.02,
        "model_type": "diffusion_gemma",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": True,
        "transformers_version": "5.23.0",
        "vision_config": VISION_CONFIG,
    }


def generation_config_json(size: str) -> dict[str, Any]:
    return {
        "bos_token_id": 2,
        "confidence_threshold": 0.005,
        "eos_token_id": [1, 106, 50],
        "max_denoising_steps": SIZES[size]["max_denoising_steps"],
        "max_new_tokens": SIZES[size]["max_new_tokens"],
        "pad_token_id": 0,
        "return_dict_in_generate": True,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1,
        "t_max": 0.8,
        "t_min": 0.4,
        "transformers_version": "5.23.0",
    }


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) weights; scales that initialise to one get 1 + 0.1 N(0, 1), so a wrong norm is caught (spec 9.2)."""
    noise = torch.randn(shape, generator=gen)
    return 1.0 + 0.1 * noise if _is_scale(name) else 0.02 * noise


def _is_scale(name: str) -> bool:
    return name.endswith(("norm.weight", "router.scale", "router.per_expert_scale"))


def _layer_scalar(key: str) -> torch.Tensor:
    """Distinct decoder and encoder scalars per layer, so sharing the wrong buffer is caught (spec 9.2)."""
    i = int(key.split(".layers.")[1].split(".")[0])
    value = 0.8 - 0.05 * i if key.startswith("model.encoder.") else 1.1 + 0.05 * i
    return torch.tensor([value])


def random_model(
    size: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0, quantization: str | None = None
) -> tuple[DiffusionGemma, ModelConfig, GenerationDefaults]:
    """A model of this size with random weights made on the device itself (what load_model returns), initialised as
    the checkpoints are but from the device's generator: no file, no host copy of the weights. `quantization` ("fp8",
    "nvfp4") quantizes what dgserve quantizes at load, one expert at a time, so the bf16 model never exists whole."""
    config = model_config_from_dict(config_json(size))
    with torch.device("meta"):
        model = DiffusionGemma(config, expert_row_alignment=4).to(dtype)
        if quantization is not None:
            apply_plan(model, load_time_plan(quantization), DECODER_PREFIX)
    model.to_empty(device=device)
    model.init_constants()
    gen = torch.Generator(device).manual_seed(seed)
    quantized = {f"{name}.": module for name, module in model.named_modules() if isinstance(module, QuantizedWeight)}
    with torch.no_grad():
        for module in quantized.values():
            for index in range(module.shape[0]) if len(module.shape) == 3 else [slice(None)]:
                weight = torch.empty(module.shape[-2:], device=device, dtype=dtype).normal_(generator=gen)
                module.quantize_from(weight.mul_(0.02), index)
        for name, tensor in model.state_dict().items():
            key = param_to_checkpoint_key(name)
            if name.startswith(tuple(quantized)):
                continue
            if key.endswith("layer_scalar"):
                tensor.copy_(_layer_scalar(key))
            else:
                tensor.normal_(generator=gen).mul_(0.1 if _is_scale(key) else 0.02).add_(1.0 if _is_scale(key) else 0)
    choose_kernels(model, torch.device(device), dtype)
    return model.eval(), config, generation_defaults_from_dict(generation_config_json(size))


def random_tensors(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """All checkpoint tensors of a size, fp32, keyed by their real names."""
    cfg = config_json(size)
    with torch.device("meta"):
        shapes = {param_to_checkpoint_key(n): tuple(t.shape) for n, t in DiffusionGemma(model_config_from_dict(cfg))
                  .state_dict().items()}  # fmt: skip
    shapes.update(_vision_shapes(cfg["text_config"]["hidden_size"]))
    gen = torch.Generator().manual_seed(seed)
    return {
        key: _layer_scalar(key) if key.endswith("layer_scalar") else _init_tensor(key, shape, gen)
        for key, shape in sorted(shapes.items())
    }


def write_random_checkpoint(
    directory: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 1,
) -> Path:
    """Write a full checkpoint directory (weights, configs, tokenizer) and return its path."""
    if size not in WRITABLE:
        raise ValueError(f"unknown checkpoint size {size!r}; choose from {WRITABLE}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_json(size)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_json(size), indent=2) + "\n")
    tensors = {key: t.to(dtype).contiguous() for key, t in random_tensors(size, seed).items()}
    save_shards(tensors, out, num_shards)
    write_tokenizer(out, cfg["text_config"]["vocab_size"])
    return out


def save_shards(tensors: dict[str, torch.Tensor], out: Path, num_shards: int) -> None:
    metadata = {"format": "pt"}
    if num_shards == 1:
        save_file(tensors, out / "model.safetensors", metadata=metadata)
        return
    keys = list(tensors)
    weight_map = {}
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[shard::num_shards]}
        save_file(part, out / name, metadata=metadata)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
