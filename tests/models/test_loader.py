"""Checkpoint format: our writer against transformers' loader, sharding, config forms, and load-time errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaForBlockDiffusion

from models.config import ConfigError, load_config
from models.loader import CheckpointError, load_model
from models.random_checkpoint import write_random_checkpoint
from tests.models.test_parity import assert_logits_match, make_case, our_logits, reference_logits


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_reference_loads_our_checkpoint_and_agrees(tiny_checkpoint, dtype):
    ref, info = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    encoder_layers = ref.model.encoder.language_model.layers
    assert [round(float(layer.layer_scalar), 2) for layer in encoder_layers] == [0.8, 0.75, 0.7, 0.65]
    ours, config, _ = load_model(tiny_checkpoint, dtype=dtype, progress=False)
    case = make_case([6, 25], 1, config.canvas_length, seed=11)
    assert_logits_match(our_logits(ours, config, case, None), reference_logits(ref.eval(), case, None), dtype)


def test_writer_is_deterministic_and_in_the_real_format(tiny_checkpoint, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", "tiny", seed=0, dtype=torch.float32)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    config = json.loads((again / "config.json").read_text())
    assert config["text_config"]["per_layer_config"] == {
        "1": {"head_dim": 32, "num_key_value_heads": 1},
        "3": {"head_dim": 32, "num_key_value_heads": 1},
    }
    keys = set(load_file(again / "model.safetensors"))
    assert len(keys) == 112  # what transformers' save_pretrained writes for this config
    assert "lm_head.weight" not in keys and not any(k.startswith("model.encoder.language_model.embed") for k in keys)
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in keys  # full layers: K = V
    other_seed = write_random_checkpoint(tmp_path / "seed1", "tiny", seed=1, dtype=torch.float32)
    assert (other_seed / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_sharded_checkpoint_loads_the_same_weights(tiny_checkpoint, tmp_path):
    sharded = write_random_checkpoint(tmp_path / "sharded", "tiny", seed=0, dtype=torch.float32, num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    single, _, _ = load_model(tiny_checkpoint, progress=False)
    split, _, _ = load_model(sharded, progress=False)
    for (name, a), (_, b) in zip(single.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(sharded)
    assert torch.equal(ref.model.decoder.embed_tokens.weight, single.embed_tokens.weight)


def test_tied_and_shared_weights_are_held_once(tiny_checkpoint):
    model, _, _ = load_model(tiny_checkpoint, progress=False)
    num_params = sum(p.numel() for p in model.parameters())
    on_disk = sum(t.numel() for k, t in load_file(tiny_checkpoint / "model.safetensors").items() if "vision" not in k)
    num_scalars = 2 * len(model.layers)  # the layer scalars are buffers, not parameters
    assert num_params == on_disk - num_scalars


def test_zero_padded_per_layer_keys_name_the_same_layers(tiny_checkpoint, tmp_path):
    """save_pretrained pads keys to the widest index ("05" ... "29" at 30 layers): parsed as ints, not looked up."""
    padded = copy_checkpoint(tiny_checkpoint, tmp_path / "padded")
    edit_config(padded, lambda c: c["text_config"].update(
        per_layer_config={f"{int(k):03d}": v for k, v in c["text_config"]["per_layer_config"].items()}))  # fmt: skip
    assert load_config(padded) == load_config(tiny_checkpoint)


def test_global_head_dim_form_equals_per_layer_config_form(tiny_checkpoint, tmp_path):
    def to_release_form(config):
        text = config["text_config"]
        del text["per_layer_config"]
        text["global_head_dim"], text["num_global_key_value_heads"] = 32, 1

    release = copy_checkpoint(tiny_checkpoint, tmp_path / "release")
    edit_config(release, to_release_form)
    assert load_config(release) == load_config(tiny_checkpoint)


def test_generation_config_supplies_the_stop_ids(tiny_checkpoint, tmp_path):
    _, generation = load_config(tiny_checkpoint)
    assert generation.eos_token_ids == (1, 106, 50) and generation.max_denoising_steps == 8
    bare = copy_checkpoint(tiny_checkpoint, tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    assert load_config(bare)[1].eos_token_ids == (1, 106, 50)  # falls back to config.json's top-level ids


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.decoder.layers.2.mlp.up_proj.weight"), "model.decoder.layers.2.mlp.up_proj.weight"),
        (
            lambda t: t.pop("model.encoder.language_model.layers.3.layer_scalar"),
            "model.encoder.language_model.layers.3.layer_scalar",
        ),
        (
            lambda t: t.update({"model.decoder.layers.0.self_attn.q_proj.weight": torch.zeros(64, 63)}),
            r"model.decoder.layers.0.self_attn.q_proj.weight.*\(64, 63\).*\(64, 64\)",
        ),
        (
            lambda t: t.update({"model.decoder.layers.1.self_attn.v_proj.weight": torch.zeros(32, 64)}),
            "model.decoder.layers.1.self_attn.v_proj.weight",
        ),
        (lambda t: t.update({"lm_head.weight": torch.zeros(2048, 64)}), "lm_head.weight"),
    ],
    ids=["missing_tensor", "missing_encoder_scalar", "wrong_shape", "v_proj_in_full_layer", "unexpected_tensor"],
)
def test_corrupt_checkpoint_fails_at_load_naming_the_tensor(tiny_checkpoint, tmp_path, edit, message):
    broken = copy_checkpoint(tiny_checkpoint, tmp_path / "broken")
    edit_tensors(broken, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(broken, progress=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="gemma4"), "model_type is 'gemma4'"),
        (lambda c: c["text_config"].update(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (lambda c: c["text_config"].pop("hidden_size"), "'hidden_size'"),
        (lambda c: c["text_config"].update(num_experts=None), "num_experts"),
        (lambda c: c["text_config"].update(layer_types=["sliding_attention"] * 4), "last layer"),
        (lambda c: c.update(tie_word_embeddings=False), "tie_word_embeddings"),
        (lambda c: c["text_config"]["per_layer_config"].update(x={}), r"per_layer_config: 'x' is not a layer index"),
        (lambda c: c["text_config"]["per_layer_config"].update({"4": {}}), "is not a layer index below 4"),
        (lambda c: c["text_config"]["per_layer_config"].update({"0": {}}), r"layer 0 \('0'\) is 'sliding_attention'"),
        (lambda c: c["text_config"]["per_layer_config"].update({"01": {}}), "layer 1 appears twice"),
    ],
    ids=[
        "model_type",
        "bidirectional_all",
        "missing_field",
        "no_experts",
        "last_layer_sliding",
        "untied",
        "layer_key_not_an_index",
        "layer_key_out_of_range",
        "layer_key_names_a_sliding_layer",
        "layer_key_twice",
    ],
)
def test_unsupported_config_fails_naming_the_field(tiny_checkpoint, tmp_path, edit, message):
    broken = copy_checkpoint(tiny_checkpoint, tmp_path / "broken")
    edit_config(broken, edit)
    with pytest.raises(ConfigError, match=message):
        load_model(broken, progress=False)


def test_config_that_is_not_json_is_a_clear_error(tiny_checkpoint, tmp_path):
    broken = copy_checkpoint(tiny_checkpoint, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON"):
        load_model(broken, progress=False)
