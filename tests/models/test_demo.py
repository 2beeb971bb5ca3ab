"""The bundled demo checkpoint (models/demo/, trained by tools/train_demo.py): it loads through the normal loader, its
replies are words of the manual it read, and its canvases settle long before the 48-step limit."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, Finished, SamplingParams
from models.hub import DEMO_CHECKPOINT, resolve_checkpoint
from models.loader import load_model
from models.tokenizer_files import write_tokenizer_config
from server.text import Tokenizer
from tools.train_demo import corpus_sections, corpus_text

# Two questions as the demo was taught them (train_demo's TOPICS and QUESTIONS), two in other words. Questions far
# from its two dozen topics ("How do I define a function?") get word salad: about two thirds words of the manual.
PROMPTS = ['What is the "for" statement?', "Tell me about list displays.", "Explain the with statement.",
           "How does the while loop work?"]  # fmt: skip
SEEDS = (0, 1, 2)


def test_the_demo_is_the_default_and_loads_through_the_loader():
    assert resolve_checkpoint(None) == resolve_checkpoint("demo") == DEMO_CHECKPOINT
    _, config, generation = load_model(DEMO_CHECKPOINT, progress=False)
    assert config.canvas_length == 256 and generation.max_denoising_steps == 48 and generation.eos_token_ids
    with safe_open(DEMO_CHECKPOINT / "model.safetensors", "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}  # noqa: SIM118
    assert sum(f.stat().st_size for f in DEMO_CHECKPOINT.iterdir()) < 12 * 2**20  # the repo stays light
    assert json.loads((DEMO_CHECKPOINT / "training.json").read_text())["seed"] == 0


def test_the_demo_chat_template_is_the_one_our_checkpoints_ship(tmp_path):
    """tokenizer_files' template, not a copy (after a change there: `train_demo.py --tokenizer-config-only`)"""
    vocab_size = json.loads((DEMO_CHECKPOINT / "config.json").read_text())["text_config"]["vocab_size"]
    write_tokenizer_config(tmp_path, vocab_size)
    assert (DEMO_CHECKPOINT / "tokenizer_config.json").read_text() == (tmp_path / "tokenizer_config.json").read_text()


@pytest.fixture(scope="module")
def replies() -> list[tuple[str, list[int], float]]:
    """(text, steps per canvas, tokens per forward) at the checkpoint's default settings, for every prompt and seed."""
    tokenizer = Tokenizer(DEMO_CHECKPOINT)
    engine = Engine(EngineConfig(str(DEMO_CHECKPOINT), max_num_seqs=len(PROMPTS) * len(SEEDS)))
    prompts = {prompt: tokenizer.chat_prompt_ids([{"role": "user", "content": prompt}], False) for prompt in PROMPTS}
    requests = {(p, seed): (prompts[p], SamplingParams(seed=seed)) for p in PROMPTS for seed in SEEDS}
    out = []
    for events in engine.generate(requests).values():
        blocks = [e for e in events if isinstance(e, BlockCommitted)]
        (finished,) = [e for e in events if isinstance(e, Finished)]
        text = tokenizer.decode([t for b in blocks for t in b.token_ids])
        out.append((text, [b.num_denoise_steps for b in blocks], finished.usage.tokens_per_forward))
    return out


def test_demo_replies_are_words_of_the_manual(replies):
    words = set(corpus_text(corpus_sections()).split())
    for text, _, _ in replies:
        reply = text.split()
        assert reply and sum(w in words for w in reply) >= 0.8 * len(reply), text


def test_demo_canvases_stop_early_and_commit_many_tokens_per_forward(replies):
    steps = [n for _, per_canvas, _ in replies for n in per_canvas]
    per_forward = [tpf for _, _, tpf in replies]
    assert sum(steps) / len(steps) < 24, steps  # half the 48-step maximum
    assert sum(per_forward) / len(per_forward) > 2, per_forward
