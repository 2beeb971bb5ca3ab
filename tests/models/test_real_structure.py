"""The real model's structure at a tiny width (spec 1: 30 layers in the 5:1 pattern, 128 experts top-8, 16 query
heads, KV heads 8 / 2, head dims 256 / 512, window 1024, the real vocabulary, canvas 256), saved by transformers'
own save_pretrained: the checkpoint form and the scale at which the last loader and parity bugs hid.

save_pretrained zero-pads per_layer_config keys at this depth ("05" ... "29"), and 30 layers of top-8-of-128
routing turn a 1e-7 difference inside one MoE layer into other experts and other tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from models.config import load_config
from models.diffusion_gemma import Experts
from models.loader import load_model
from models.random_checkpoint import config_json, generation_config_json
from models.tokenizer_files import write_tokenizer
from tests.conftest import perturbed_reference
from tests.engine.test_engine import assert_same_tokens, output_tokens, reference_generate
from tests.models.test_parity import assert_logits_match, make_case, our_logits, reference_logits


@pytest.fixture(scope="module")
def structure_checkpoint(tmp_path_factory):
    """Built and saved by transformers (fp32), norms and layer scalars perturbed as spec 9.2 says."""
    source = tmp_path_factory.mktemp("structure-config")
    (source / "config.json").write_text(json.dumps(config_json("structure")))
    # Smaller scalar steps than the tiny config's: 30 layers of 0.05 would turn the encoder's scalars negative.
    model = perturbed_reference(DiffusionGemmaConfig.from_pretrained(source), (1.1, 0.02), (0.9, -0.01))
    out = tmp_path_factory.mktemp("structure")
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(generation_config_json("structure")))
    write_tokenizer(out, 262144)
    return out


def load_reference(checkpoint, dtype: torch.dtype) -> DiffusionGemmaForBlockDiffusion:
    """The reference with its weights copied out of the memory-mapped file. CPU GEMMs round by the weights'
    memory alignment, and safetensors places tensors at 8-byte offsets; our loader copies into fresh (aligned)
    memory, so the reference does too, or an fp32 comparison would measure the file layout."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=dtype).eval()
    for param in model.parameters():
        param.data = param.data.clone()
    return model


@pytest.fixture(scope="module")
def reference(structure_checkpoint):
    return load_reference(structure_checkpoint, torch.float32)


def test_config_reads_zero_padded_per_layer_keys(structure_checkpoint):
    text = json.loads((structure_checkpoint / "config.json").read_text())["text_config"]
    assert sorted(text["per_layer_config"]) == ["05", "11", "17", "23", "29"]  # the form we must read
    config, _ = load_config(structure_checkpoint)
    full = [i for i, g in enumerate(config.layers) if not g.is_sliding]
    assert full == [5, 11, 17, 23, 29]
    assert {(g.head_dim, g.num_kv_heads) for g in config.layers if g.is_sliding} == {(256, 8)}
    assert {(g.head_dim, g.num_kv_heads) for g in config.layers if not g.is_sliding} == {(512, 2)}
    assert (config.num_experts, config.top_k_experts, config.vocab_size) == (128, 8, 262144)


def test_our_writer_uses_the_same_key_form():
    assert sorted(config_json("structure")["text_config"]["per_layer_config"]) == ["05", "11", "17", "23", "29"]
    assert sorted(config_json("demo")["text_config"]["per_layer_config"]) == ["5"]


def test_experts_equal_the_reference_experts_in_fp32(structure_checkpoint, reference):
    """torch.equal, not a tolerance: the same sort gives the same rows in the same group places as the reference.
    90 tokens x top-8 of 128 experts puts about 5-7 rows in each group, where CPU grouped_mm rounds by place."""
    ref_experts = reference.model.decoder.layers[0].experts
    config, _ = load_config(structure_checkpoint)
    ours = Experts(config)
    ours.load_state_dict({"gate_up_proj": ref_experts.gate_up_proj, "down_proj": ref_experts.down_proj})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, config.hidden_size, generator=gen)
    experts = torch.stack([torch.randperm(128, generator=gen)[:8] for _ in range(90)])
    weights = torch.rand(90, 8, generator=gen)
    group_sizes = torch.bincount(experts.flatten(), minlength=128)
    assert group_sizes.float().mean() == 720 / 128 and int(group_sizes.max()) > 5
    with torch.no_grad():
        expected = ref_experts(x, experts, weights)
        assert torch.equal(ours(x, weights, experts), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_logits_match_the_reference(structure_checkpoint, dtype):
    """A 40-token prompt, one committed canvas, then a canvas: bf16 bit for bit, fp32 within 1e-5."""
    ref = load_reference(structure_checkpoint, dtype)
    ours, config, _ = load_model(structure_checkpoint, dtype=dtype, progress=False)
    case = make_case([40], 1, config.canvas_length, seed=11)
    assert_logits_match(our_logits(ours, config, case, None), reference_logits(ref, case, None), dtype)


def test_reference_mode_matches_generate_token_for_token(structure_checkpoint, reference):
    """fp32, a whole 256-token canvas and a few steps: the run that differed at 222 of 256 tokens."""
    ids = torch.randint(3, 2048, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference_generate(reference, ids, 4, max_new_tokens=256, max_denoising_steps=3)
    engine = Engine(EngineConfig(str(structure_checkpoint), device="cpu", dtype="float32", kv_budget_bytes=2**30,
                                 reference_mode=True, max_num_seqs=1))  # fmt: skip
    events = engine.generate({"r": (ids, SamplingParams(max_tokens=256, steps=3, seed=4))})["r"]
    assert len(expected) == 256
    assert_same_tokens(output_tokens(events), expected, "reference mode vs generate, real structure")
