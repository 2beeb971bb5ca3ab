"""`dgserve` as a user runs it: real subprocesses on checkpoints in the real format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion


def dgserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_generate_reference_mode_prints_the_tokens_transformers_generates(tiny_checkpoint):
    ids = [2, 105, 400, 107, 300, 301, 302, 106, 107, 105, 500, 107]
    run = dgserve(
        "generate", "--model", str(tiny_checkpoint), "--prompt-ids", ",".join(map(str, ids)),
        "--reference", "--seed", "7", "--steps", "6", "--max-tokens", "64", "--stop-token-ids", "", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=64, max_denoising_steps=6, eos_token_id=None)
    assert record["token_ids"] == expected.sequences[0, len(ids) :].tolist()
    assert record["finish_reason"] == "length" and record["usage"]["completion_tokens"] == 64
    assert record["usage"]["num_denoise_steps"] == 12 and record["prompt_ids"] == ids


def test_generate_warm_starts_from_canvas_ids_as_transformers_does_and_keeps_pins(tiny_checkpoint):
    ids, canvas = [2, 105, 400, 107], list(range(300, 332))  # a whole tiny canvas (32 positions)
    common = ("generate", "--model", str(tiny_checkpoint), "--prompt-ids", ",".join(map(str, ids)),
              "--canvas-ids", ",".join(map(str, canvas)), "--steps", "4", "--max-tokens", "64",
              "--stop-token-ids", "", "--json")  # fmt: skip
    run = dgserve(*common, "--reference", "--seed", "3")
    assert run.returncode == 0, run.stderr
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), decoder_input_ids=torch.tensor([canvas]),
                                      max_new_tokens=64, max_denoising_steps=4, eos_token_id=None)  # fmt: skip
    assert json.loads(run.stdout)["token_ids"] == expected.sequences[0, len(ids) :].tolist()
    pinned = json.loads(dgserve(*common, "--pinned", "0:3,10:12", "--seed", "1").stdout)["token_ids"]
    assert pinned[:3] == canvas[:3] and pinned[10:12] == canvas[10:12]
    bad = dgserve(*common, "--pinned", "0:40")
    assert bad.returncode != 0 and "pinned span [0, 40) is not inside the given canvas of 32 tokens" in bad.stderr


def test_generate_applies_the_chat_template_and_prints_text(tiny_checkpoint):
    run = dgserve("generate", "--model", str(tiny_checkpoint), "--prompt", "Hello there", "--max-tokens", "20",
                  "--seed", "1", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    # <bos><|turn>user\n ... <|turn>model\n<|channel>thought\n<channel|>: the empty thought channel (spec 7)
    assert record["prompt_ids"][:2] == [2, 105] and record["prompt_ids"][-1] == 101 and 100 in record["prompt_ids"]
    assert len(record["token_ids"]) <= 20 and isinstance(record["text"], str)


def test_generate_rejects_bad_parameters_with_a_clear_message(tiny_checkpoint):
    run = dgserve("generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-tokens", "0")
    assert run.returncode != 0 and "max_tokens must be >= 1" in run.stderr
    run = dgserve("generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--steps", "0")
    assert run.returncode != 0 and "steps must be >= 1 and <= 1024, got 0" in run.stderr


def test_write_checkpoint_then_generate_from_the_random_demo_cache(tmp_path):
    written = dgserve("write-checkpoint", str(tmp_path / "ck"), "--size", "tiny", "--shards", "2")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    run = dgserve("generate", "--model", "random-demo", "--prompt", "hi", "--max-tokens", "8", "--steps", "2",
                  env={"DGSERVE_CACHE": str(tmp_path)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stderr and (tmp_path / "random-demo-checkpoint" / "config.json").is_file()


def test_generate_without_a_model_runs_the_bundled_demo(tmp_path):
    run = dgserve("generate", "--prompt", "What is the \"for\" statement?", "--seed", "0", "--json",
                  env={"DGSERVE_CACHE": str(tmp_path)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    # The trained demo ends its turn inside the first canvas, well before the 48-step limit; nothing is written.
    assert "trained on the Python manual" in run.stderr and record["finish_reason"] == "stop"
    assert record["usage"]["num_denoise_steps"] < 48 and not any(tmp_path.iterdir())


def test_serve_switches_fill_their_config_field_and_refuse_a_value_that_is_no_switch(monkeypatch):
    from server.cli import _fills, build_parser

    def engine(*args: str) -> dict:
        return _fills(build_parser().parse_args(["serve", *args]), "engine")

    monkeypatch.delenv("DGSERVE_PREFIX_CACHING", raising=False)
    assert engine()["enable_prefix_caching"] is True and engine("--no-prefix-caching")["enable_prefix_caching"] is False
    assert engine("--prefix-cache-fraction", "0.3")["prefix_cache_fraction"] == 0.3
    monkeypatch.setenv("DGSERVE_PREFIX_CACHING", "False")
    assert engine()["enable_prefix_caching"] is False
    monkeypatch.setenv("DGSERVE_PREFIX_CACHING", "flase")  # a typo must not leave it on
    with pytest.raises(SystemExit, match="DGSERVE_PREFIX_CACHING='flase'"):
        engine()
