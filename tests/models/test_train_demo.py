"""tools/train_demo.py: its training forward is the served forward, and the documented command on a slice of the
corpus makes the loss fall, writes a checkpoint the normal loader reads, and writes the same bytes for the same seed."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from models.hub import DEMO_CHECKPOINT
from models.loader import load_model
from tests.models.dense_cache import KVCache
from tools.train_demo import LoopExperts, denoise_logits, encode

ROOT = Path(__file__).resolve().parents[2]


def train(out: Path, steps: int) -> subprocess.Popen:
    command = [sys.executable, "tools/train_demo.py", "--out", str(out), "--steps", str(steps), "--batch-size", "2",
               "--lr", "1e-2", "--max-chars", "30000"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's packages, whichever one is pip-installed
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(run: subprocess.Popen) -> str:
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    return output


def test_the_training_forward_is_the_served_forward():
    """Right-padded prefixes and both decoder inputs (no SC, SC) against encode / denoise / logits on a KV cache."""
    model, config, _ = load_model(DEMO_CHECKPOINT, progress=False)
    gen = torch.Generator().manual_seed(0)
    lengths, canvas_length = torch.tensor([30, 17]), config.canvas_length
    prefixes = torch.randint(config.vocab_size, (2, 30), generator=gen).masked_fill(
        torch.arange(30) >= lengths[:, None], 0
    )
    canvas = torch.randint(config.vocab_size, (2, canvas_length), generator=gen)
    soft = torch.randn(2, canvas_length, config.hidden_size, generator=gen)
    served = []
    for row, length in enumerate(lengths.tolist()):
        cache, positions = KVCache(config, 1), torch.arange(length)[None]
        model.encode(prefixes[row : row + 1, :length], positions, cache.encoder_attention(positions, positions < 0))
        canvas_positions = length + torch.arange(canvas_length)[None]
        for sc in (None, soft[row : row + 1]):
            hidden = model.denoise(canvas[row : row + 1], canvas_positions, cache.decoder_attention(canvas_length), sc)
            served.append(model.logits(hidden)[0])
    for layer in model.layers:
        layer.experts = LoopExperts(layer.experts)
    with torch.no_grad():
        kv = encode(model, prefixes, lengths)
        trained = [denoise_logits(model, canvas, lengths, kv, sc) for sc in (None, soft)]
    for row in range(2):
        for i in range(2):
            torch.testing.assert_close(trained[i][row], served[2 * row + i], rtol=0, atol=1e-4)


def test_a_short_run_learns_and_writes_a_loadable_checkpoint(tmp_path):
    output = finish(train(tmp_path, 16))
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", output)]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, output
    model, config, _ = load_model(tmp_path, progress=False)
    assert config.canvas_length == 256 and config.vocab_size == model.embed_tokens.num_embeddings == 4096
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 16


def test_the_same_seed_writes_the_same_checkpoint(tmp_path):
    first, second = train(tmp_path / "a", 2), train(tmp_path / "b", 2)
    finish(first), finish(second)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_runtime_never_imports_the_training_script():
    for path in [p for package in ("server", "engine", "models") for p in (ROOT / package).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] == "tools" for name in names), path
