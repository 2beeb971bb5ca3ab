"""DiffusionGemma configuration read from a checkpoint's config.json and generation_config.json (spec 1, 6.1).

Only the text stack is modelled; vision fields are read past. Anything we do not implement fails here with the
name of the offending field, not later inside a forward.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json or generation_config.json that dgserve cannot serve."""


@dataclass(frozen=True, slots=True)
class LayerGeometry:
    """Attention shape of one layer: sliding layers and full layers differ (spec 1.2, 1.3)."""

    is_sliding: bool
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_fraction: float  # share of the head's frequency pairs that rotate; the rest get inv_freq 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The text stack of DiffusionGemmaForBlockDiffusion."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    moe_intermediate_size: int  # width of one expert
    num_experts: int
    top_k_experts: int
    num_attention_heads: int
    layers: tuple[LayerGeometry, ...]
    sliding_window: int  # W: encoder queries see themselves plus W-1 earlier tokens; the cache keeps W-1
    rms_norm_eps: float
    final_logit_softcapping: float
    canvas_length: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]  # config.json's; generation uses GenerationDefaults.eos_token_ids

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The checkpoint's sampler settings (generation_config.json, spec 6.1)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return cfg[key]


def _per_layer_overrides(per_layer: Any, layer_types: list[str]) -> dict[int, dict[str, Any]]:
    """per_layer_config keyed by layer index. save_pretrained zero-pads the keys to the widest index present
    ({"05": ..., "29": ...}), and transformers reads them back with int(), so keys are parsed, never looked up."""
    if not isinstance(per_layer, dict):
        raise ConfigError("text_config.per_layer_config must be an object keyed by layer index")
    overrides: dict[int, dict[str, Any]] = {}
    for key, override in per_layer.items():
        if not re.fullmatch(r"[0-9]+", str(key)) or int(key) >= len(layer_types):
            raise ConfigError(f"text_config.per_layer_config: {key!r} is not a layer index below {len(layer_types)}")
        i = int(key)
        if i in overrides:
            raise ConfigError(f"text_config.per_layer_config: layer {i} appears twice")
        if layer_types[i] != FULL:
            raise ConfigError(f"text_config.per_layer_config: layer {i} ({key!r}) is {layer_types[i]!r}, not full")
        if not isinstance(override, dict):
            raise ConfigError(f"text_config.per_layer_config.{key} must be an object")
        overrides[i] = override
    return overrides


def _layer_geometries(text: dict[str, Any]) -> tuple[LayerGeometry, ...]:
    num_layers = int(_require(text, "num_hidden_layers", "text_config"))
    layer_types = text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(f"text_config.layer_types has {len(layer_types)} entries for {num_layers} layers")
    if unknown := sorted(set(layer_types) - {SLIDING, FULL}):
        raise ConfigError(f"text_config.layer_types: unsupported layer type(s) {unknown}")
    if layer_types[-1] != FULL:
        raise ConfigError("text_config.layer_types: the last layer must be 'full_attention'")

    # Full layers take their geometry from per_layer_config (written by save_pretrained) or, in the original
    # release form, from global_head_dim / num_global_key_value_heads (spec 1.2).
    if text.get("per_layer_config") is None:
        full_override = {"head_dim": text.get("global_head_dim", 512)}
        if text.get("num_global_key_value_heads") is not None:
            full_override["num_key_value_heads"] = text["num_global_key_value_heads"]
        per_layer = {i: full_override for i, t in enumerate(layer_types) if t == FULL}
    else:
        per_layer = _per_layer_overrides(text["per_layer_config"], layer_types)

    rope = text.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    for layer_type in set(layer_types):
        params = rope.get(layer_type)
        if params is None:
            raise ConfigError(f"text_config.rope_parameters: missing entry for {layer_type!r}")
        if params.get("rope_type", "default") not in ("default", "proportional"):
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.rope_type {params['rope_type']!r} unsupported")
        if float(params.get("factor", 1.0)) != 1.0:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}.factor must be 1.0")
        if params.get("rope_type", "default") == "default" and float(params.get("partial_rotary_factor", 1.0)) != 1:
            raise ConfigError(f"text_config.rope_parameters.{layer_type}: partial rotary needs rope_type proportional")

    geometries = []
    for i, layer_type in enumerate(layer_types):
        override = per_layer.get(i, {})
        params = rope[layer_type]
        geometries.append(
            LayerGeometry(
                is_sliding=layer_type == SLIDING,
                head_dim=int(override.get("head_dim", text.get("head_dim", 256))),
                num_kv_heads=int(override.get("num_key_value_heads", text.get("num_key_value_heads", 4))),
                rope_theta=float(params["rope_theta"]),
                rope_fraction=float(params.get("partial_rotary_factor", 1.0)),
            )
        )
    return tuple(geometries)


def model_config_from_dict(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the parsed config.json of a DiffusionGemmaForBlockDiffusion checkpoint."""
    if cfg.get("model_type") != "diffusion_gemma":
        raise ConfigError(f"config.json: model_type is {cfg.get('model_type')!r}, expected 'diffusion_gemma'")
    text = _require(cfg, "text_config", "config.json")
    if text.get("use_bidirectional_attention") not in (None, "vision"):
        raise ConfigError(
            f"text_config.use_bidirectional_attention={text['use_bidirectional_attention']!r} is unsupported "
            "(only null or 'vision': a causal text encoder)"
        )
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"text_config.hidden_activation {text['hidden_activation']!r} is unsupported")
    if text.get("attention_bias", False):
        raise ConfigError("text_config.attention_bias=true is unsupported")
    if not cfg.get("tie_word_embeddings", True) or not text.get("tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=false is unsupported (the checkpoint stores one shared text stack)")
    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if not text.get(key):
            raise ConfigError(f"text_config.{key} must be set (DiffusionGemma always has an MoE branch)")

    layers = _layer_geometries(text)
    num_heads = int(_require(text, "num_attention_heads", "text_config"))
    for i, g in enumerate(layers):
        if num_heads % g.num_kv_heads:
            raise ConfigError(f"layer {i}: num_attention_heads {num_heads} not a multiple of {g.num_kv_heads} KV heads")
    config = ModelConfig(
        vocab_size=int(_require(text, "vocab_size", "text_config")),
        hidden_size=int(_require(text, "hidden_size", "text_config")),
        intermediate_size=int(_require(text, "intermediate_size", "text_config")),
        moe_intermediate_size=int(text["moe_intermediate_size"]),
        num_experts=int(text["num_experts"]),
        top_k_experts=int(text["top_k_experts"]),
        num_attention_heads=num_heads,
        layers=layers,
        sliding_window=int(text.get("sliding_window", 512)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=float(text.get("final_logit_softcapping") or 30.0),
        canvas_length=int(cfg.get("canvas_length") or 256),
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        eos_token_ids=_ids(cfg.get("eos_token_id", text.get("eos_token_id", 1))),
    )
    if config.top_k_experts > config.num_experts:
        raise ConfigError(f"text_config.top_k_experts {config.top_k_experts} > num_experts {config.num_experts}")
    return config


def generation_defaults_from_dict(cfg: dict[str, Any]) -> GenerationDefaults:
    """Parse generation_config.json; absent or null keys take the released checkpoint's values."""
    cfg = {key: value for key, value in cfg.items() if value is not None}
    default = GenerationDefaults()
    return GenerationDefaults(
        max_new_tokens=int(cfg.get("max_new_tokens", default.max_new_tokens)),
        max_denoising_steps=int(cfg.get("max_denoising_steps", default.max_denoising_steps)),
        entropy_bound=float((cfg.get("sampler_config") or {}).get("entropy_bound", default.entropy_bound)),
        t_min=float(cfg.get("t_min", default.t_min)),
        t_max=float(cfg.get("t_max", default.t_max)),
        stability_threshold=int(cfg.get("stability_threshold", default.stability_threshold)),
        confidence_threshold=float(cfg.get("confidence_threshold", default.confidence_threshold)),
        eos_token_ids=_ids(cfg.get("eos_token_id")),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def load_config(checkpoint_dir: str | os.PathLike) -> tuple[ModelConfig, GenerationDefaults]:
    """Read config.json (required) and generation_config.json (optional) from a checkpoint directory."""
    directory = Path(checkpoint_dir)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}: no config.json")
    model = model_config_from_dict(_read_json(directory / "config.json"))
    gen_path = directory / "generation_config.json"
    generation = generation_defaults_from_dict(_read_json(gen_path)) if gen_path.is_file() else GenerationDefaults()
    if not generation.eos_token_ids:
        # Without generation_config.json only config.json's eos ids are known (spec 7: then <turn|> may be missed).
        generation = replace(generation, eos_token_ids=model.eos_token_ids)
    return model, generation
