"""Train the demo checkpoint bundled in models/demo/: a tiny DiffusionGemma that has read the Python manual.

    python tools/train_demo.py                          # about 30 minutes on one CPU thread; rewrites models/demo/
    python tools/train_demo.py --tokenizer-config-only  # after a chat template change in models/tokenizer_files.py

The corpus is `pydoc_data.topics`, the language reference every CPython ships, so training needs no network. The
objective is what the sampler relies on (spec 4-6): a clean prefix encoded causally (encoder layer scalars) into
K/V, then a 256-token canvas in which a random fraction of positions holds the clean tokens and the rest uniform
random ids (what renoising leaves), denoised bidirectionally over prefix + canvas (decoder layer scalars) and scored
by cross entropy at every canvas position. Self-conditioning is trained as the sampler uses it: half the canvases
are a first step (no soft embedding), the other half a later one, fed the detached soft embedding of a first pass.

Nine in ten examples are chat turns (a question on one of TOPICS, answered by that section's opening sentence, then
<turn|> and pad), so replies end and canvases settle; the rest continue plain text from anywhere in the manual.
The same seed, torch and Python write the same checkpoint, bit for bit (on the one thread it pins). The server never
imports this file.
"""

from __future__ import annotations

import argparse
import json
import math
import pydoc_data.topics
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import AutoTokenizer

from models.attend import causal_mask, sdpa
from models.config import model_config_from_dict
from models.diffusion_gemma import DiffusionGemma, Experts, rms_norm
from models.loader import param_to_checkpoint_key
from models.random_checkpoint import config_json, generation_config_json
from models.tokenizer_files import write_tokenizer, write_tokenizer_config

OUT = Path(__file__).resolve().parents[1] / "models" / "demo"
S, F_ = "sliding_attention", "full_attention"
# Small enough to learn in minutes on two cores; the last layer is full attention, as the config requires.
SHAPE = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8, top_k_experts=2,
    num_hidden_layers=4, layer_types=[S, S, S, F_], num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    sliding_window=1024, max_position_embeddings=32768,
)  # fmt: skip
FULL_LAYER = {"head_dim": 64, "num_key_value_heads": 1}
CANVAS = 256
PAD, BOS, END_OF_TURN = 0, 2, 106
CHAT_SHARE = 0.9
# The sections asked about in chat turns: uniform-noise denoising learns slowly, and in the time budget a model this
# size can be sure of a couple of dozen answers, not of all 164 (the plain-text examples still cover every section).
TOPICS = (
    'The "assert" statement', "Assignment statements", "Augmented assignment statements", "Calls",
    "Class definitions", "Membership test operations", 'The "if" statement', 'The "while" statement',
    'The "for" statement', 'The "try" statement', '"except" clause', '"finally" clause', "Function definitions",
    "With Statement Context Managers", "Dictionary displays", "Exceptions", "List displays", "Numeric literals",
    "Slicings", "String Methods", "Truth Value Testing", "Generator functions", "Methods", "Ranges",
)  # fmt: skip
REPLY = 32  # tokens of a chat answer at most: short answers settle in few denoising steps
MAX_CONTEXT = 128  # prefix tokens of a plain-text example
QUESTIONS = ("{title}", "Tell me about {lower}.", "What is {lower}?", "Explain {lower}.", "How does {lower} work?")
# Pre-tokens for BPE training only: words keep their leading space, digits stand alone, space runs and newlines are
# their own pieces. The served pipeline (tokenizer_files) has no pre-tokenizer; the corpus is encoded with it.
PRE_TOKENS = r"▁?[A-Za-z]+|▁?[0-9]|▁?[^A-Za-z0-9▁\n]+|▁+(?=▁)|▁+|\n+"


def corpus_sections(max_chars: int | None = None) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) for each section of the manual: a heading is a line underlined with * = - or ~."""
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))[:max_chars]
    parts = re.split(r"^(.+)\n[*=\-~]{3,}\n", text, flags=re.MULTILINE)
    sections, seen = [], set()
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        paragraphs = [p.strip("\n") for p in body.split("\n\n") if p.strip()]
        if paragraphs and (title, *paragraphs) not in seen:  # some topics repeat whole sections ("if", "else")
            seen.add((title, *paragraphs))
            sections.append((title, paragraphs))
    return sections


def corpus_text(sections: list[tuple[str, list[str]]]) -> str:
    """The training text: every section as its title and paragraphs (the underlines dropped)."""
    return "\n\n".join("\n\n".join([title, *paragraphs]) for title, paragraphs in sections)


def train_tokenizer(text: str, vocab_size: int, out: Path) -> None:
    """BPE learned on `text`, laid out like tokenizer_files' offline tokenizer: its control ids, "\\n" id, chat
    template and pipeline, then byte-fallback pieces and the learned vocabulary."""
    write_tokenizer(out, vocab_size)  # everything but the vocabulary and merges, which are replaced below
    spec = json.loads((out / "tokenizer.json").read_text())
    fixed = {t["id"]: t["content"] for t in spec["added_tokens"]} | {spec["model"]["vocab"]["\n"]: "\n"}
    first_text_id = max(fixed) + 1
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENS), behavior="isolated")
    budget = vocab_size - first_text_id - 256 + 1  # + 1: "\n" is learned as well but already has its id
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=budget, show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    pieces = [f"<0x{b:02X}>" for b in range(256)] + [p for p in sorted(learned["vocab"], key=learned["vocab"].get)
                                                     if p != "\n"]  # fmt: skip
    layout = [fixed.get(i) for i in range(first_text_id)] + pieces
    unused = iter(range(vocab_size))
    layout = [p if p is not None else f"<unused{next(unused)}>" for p in layout]
    layout += [f"<unused{next(unused)}>" for _ in range(vocab_size - len(layout))]  # a short corpus learns fewer
    spec["model"]["vocab"] = {piece: i for i, piece in enumerate(layout)}
    spec["model"]["merges"] = learned["merges"]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _answer(text: str, tokenizer) -> list[int]:
    """The ids of a section's opening sentences, as many as fit in REPLY tokens; none if the first does not fit."""
    answer: list[int] = []
    for end in re.finditer(r"[.?!][)\"]?(?=\s|$)|:(?=\n\n)", text):  # a sentence, or the lead-in to a block
        ids = tokenizer.encode(text[: end.end()], add_special_tokens=False)
        if len(ids) > REPLY:
            break
        answer = ids
    return answer


class Examples:
    """Training examples (prefix ids, canvas ids) drawn from one generator."""

    def __init__(self, sections: list[tuple[str, list[str]]], tokenizer, gen: torch.Generator) -> None:
        self.gen = gen
        self.stream = tokenizer.encode(corpus_text(sections), add_special_tokens=False)
        self.turns = []  # (prompt ids per question, canvas ids) per section
        for title, paragraphs in sections:
            if title in TOPICS and (reply := _answer("\n\n".join(paragraphs), tokenizer)):
                lower = title if title[:2].isupper() else title[0].lower() + title[1:]
                chats = [[{"role": "user", "content": q.format(title=title, lower=lower)}] for q in QUESTIONS]
                prompts = [  # as the server builds them (server/text.py)
                    tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                                     add_special_tokens=False)
                    for c in chats
                ]  # fmt: skip
                self.turns.append((prompts, reply + [END_OF_TURN] + [PAD] * (CANVAS - 1 - len(reply))))

    def _int(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.gen))

    def chat(self) -> tuple[list[int], list[int]]:
        """A question on a section and the canvas the sampler commits for a finished reply: the section's answer,
        <turn|>, pad. One answer per section, so that the model can learn it well enough to be sure of it."""
        prompts, canvas = self.turns[self._int(len(self.turns))]
        return prompts[self._int(len(prompts))], canvas

    def text(self) -> tuple[list[int], list[int]]:
        """Plain text: up to MAX_CONTEXT tokens after <bos>, then the next 256 tokens."""
        context = self._int(MAX_CONTEXT + 1)
        start = context + self._int(len(self.stream) - CANVAS - context)
        return [BOS, *self.stream[start - context : start]], self.stream[start : start + CANVAS]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prefixes [B, P], their lengths [B], clean canvases [B, 256]."""
        pairs = [self.chat() if torch.rand((), generator=self.gen) < CHAT_SHARE else self.text() for _ in range(size)]
        width = max(len(prefix) for prefix, _ in pairs)
        prefixes = torch.tensor([prefix + [PAD] * (width - len(prefix)) for prefix, _ in pairs])
        lengths = torch.tensor([len(prefix) for prefix, _ in pairs])
        return prefixes, lengths, torch.tensor([canvas for _, canvas in pairs])


class LoopExperts(nn.Module):
    """Experts.forward with gradients, over the same parameters: the runtime's grouped_mm op has no backward, so
    here each expert is a plain GEMM over the rows routed to it. Swapped in for training only; the state-dict keys
    stay those of Experts."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32)  # summed in fp32, as Experts does
        for e in range(self.gate_up_proj.shape[0]):
            token, k = torch.nonzero(experts == e, as_tuple=True)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])
            out = out.index_add(0, token, y.float() * weights[token, k, None])
        return out.to(x.dtype)


def encode(model: DiffusionGemma, prefixes: torch.Tensor, lengths: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The encoder pass (DiffusionGemma.encode with gradients): each layer's K/V of the right-padded prefixes."""
    config = model.config
    positions = torch.arange(prefixes.shape[1]).expand_as(prefixes)
    key_positions = positions.masked_fill(positions >= lengths[:, None], -1)  # pads: stored, never attended to
    masks = {s: causal_mask(key_positions, positions, config.sliding_window if s else None) for s in (False, True)}
    kv = []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv.append((k, v))
        return sdpa(q, k, v, masks[config.layers[layer].is_sliding])

    x = model.embed(prefixes)
    rope = model._rope(positions, x.dtype)
    *layers, last = model.layers
    for i, layer in enumerate(layers):
        x = layer(x, rope[config.layers[i].is_sliding], partial(attend, i), layer.encoder_layer_scalar)
    kv.append(last.self_attn.project_kv(last.input_layernorm(x), *rope[config.layers[-1].is_sliding]))
    return kv


def denoise_logits(
    model: DiffusionGemma,
    canvas: torch.Tensor,  # [B, C] noisy ids
    lengths: torch.Tensor,  # [B] prefix lengths: the canvas follows at lengths .. lengths + C - 1
    kv: list[tuple[torch.Tensor, ...]],
    soft_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """The decoder pass (DiffusionGemma.denoise, then logits, with gradients): softcapped fp32 logits [B, C, V]."""
    config = model.config
    positions = lengths[:, None] + torch.arange(canvas.shape[1])
    prefix_valid = torch.arange(kv[0][0].shape[2]) < lengths[:, None]
    mask = torch.cat([prefix_valid, torch.ones_like(canvas, dtype=torch.bool)], 1)[:, None, None, :]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prefix_k, prefix_v = kv[layer]
        return sdpa(q, torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2), mask)

    e = model.embed(canvas)
    x = rms_norm(e, None, config.rms_norm_eps) if soft_embeds is None else model.self_conditioning(e, soft_embeds)
    rope = model._rope(positions, x.dtype)
    for i, layer in enumerate(model.layers):
        x = layer(x, rope[config.layers[i].is_sliding], partial(attend, i), layer.layer_scalar)
    cap = config.final_logit_softcapping
    return cap * torch.tanh(F.linear(model.norm(x), model.embed_tokens.weight).float() / cap)


def loss(model: DiffusionGemma, prefixes, lengths, clean, gen: torch.Generator) -> torch.Tensor:
    """Cross entropy over canvases renoised at a random rate per row. Half the rows are a canvas' first step (no
    self-conditioning); the other half are later steps, fed the soft embedding of a first pass without gradients."""
    b, c = clean.shape
    keep = torch.rand(b, c, generator=gen) < torch.rand(b, 1, generator=gen)
    canvas = torch.where(keep, clean, torch.randint(model.config.vocab_size, (b, c), generator=gen))
    kv = encode(model, prefixes, lengths)
    soft = torch.zeros(b, c, model.config.hidden_size)  # zero gives exactly the no-SC input (DiffusionGemma.denoise)
    later = torch.arange(b) >= b // 2
    with torch.no_grad():  # as the sampler: softmax(z / T) @ E * sqrt(H) at its schedule temperature T
        first = denoise_logits(model, canvas[later], lengths[later], [(k[later], v[later]) for k, v in kv], None)
        temperature = 0.4 + 0.4 * torch.rand(int(later.sum()), 1, 1, generator=gen)
        soft[later] = F.softmax(first / temperature, dim=-1) @ model.embed_tokens.weight * model.embed_scale
    logits = denoise_logits(model, canvas, lengths, kv, soft)
    return F.cross_entropy(logits.flatten(0, 1), clean.flatten())


def init_weights(model: DiffusionGemma) -> None:
    """Initialised so that a small model learns fast; all of it is just weights to the checkpoint.

    Matrices are N(0, 0.02) and the embedding N(0, 1/H), so that E * sqrt(H) enters the encoder at unit scale. The
    norms that close a residual branch start at 0.1: each of a layer's two branches is RMS-normed, so at one it would
    add unit-scale noise that drowns the token identity; q_norm and k_norm start at d^-1/4, because attention has
    scale 1.0 and unit q and k would saturate its softmax (logits of std sqrt(d)). Other norms and the router's
    scales start at one.
    """
    hidden = model.config.hidden_size
    for name, param in model.named_parameters():
        if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            torch.nn.init.constant_(param, 0.1)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            torch.nn.init.constant_(param, param.numel() ** -0.25)
        elif name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.normal_(param, std=hidden**-0.5 if name == "embed_tokens.weight" else 0.02)


def write_checkpoint(model: DiffusionGemma, out: Path, config: dict, record: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_json("demo"), indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    tensors = {param_to_checkpoint_key(n): t.detach().to(torch.bfloat16) for n, t in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def demo_config(vocab_size: int) -> dict:
    """config.json: the random writer's real-format file with this shape in place of the random demo's."""
    config = config_json("demo")
    text = config["text_config"] | SHAPE | {"vocab_size": vocab_size}
    text["per_layer_config"] = {str(i): FULL_LAYER for i, t in enumerate(text["layer_types"]) if t == F_}
    image_ids = dict(boi_token_id=vocab_size - 3, eoi_token_id=vocab_size - 2, image_token_id=vocab_size - 1)
    return config | image_ids | {"text_config": dict(sorted(text.items()))}


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, max_chars: int | None = None) -> list[float]:
    """Train from scratch and write the checkpoint into `out`; returns the loss of every step."""
    # One thread, always: the thread count splits the float sums, so it is part of what the seed fixes (and on a busy
    # machine two OpenMP threads wait for each other at every op: 13x slower, measured on 2 shared cores).
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    sections = corpus_sections(max_chars)
    train_tokenizer(corpus_text(sections), SHAPE["vocab_size"], out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    examples = Examples(sections, tokenizer, gen)
    config = demo_config(SHAPE["vocab_size"])
    model = DiffusionGemma(model_config_from_dict(config))
    init_weights(model)
    for layer in model.layers:
        layer.experts = LoopExperts(layer.experts)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {len(examples.stream)} corpus "
          f"tokens, {len(examples.turns)} chat topics", flush=True)  # fmt: skip
    losses, started = [], time.perf_counter()
    for step in range(steps):
        value = loss(model, *examples.batch(batch_size), gen)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(value.item())
        if (step + 1) % max(1, steps // 40) == 0 or step + 1 == steps:
            window = losses[-max(1, steps // 40) :]
            print(f"step {step + 1:5d}  loss {sum(window) / len(window):.3f}  {time.perf_counter() - started:6.0f} s",
                  flush=True)  # fmt: skip
    final_loss = round(sum(losses[-20:]) / len(losses[-20:]), 4)
    record = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, torch=torch.__version__,
                  python=sys.version.split()[0], final_loss=final_loss)  # fmt: skip
    write_checkpoint(model, out, config, record)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=4)  # learning goes by steps more than by examples
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, help="train on the corpus' first N characters (smoke tests)")
    parser.add_argument("--tokenizer-config-only", action="store_true",
                        help="only rewrite tokenizer_config.json (e.g. after a change to the chat template in "
                        "models/tokenizer_files.py); the weights and vocabulary stay")  # fmt: skip
    args = parser.parse_args()
    if args.tokenizer_config_only:
        write_tokenizer_config(args.out, SHAPE["vocab_size"])
        return
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.max_chars)


if __name__ == "__main__":
    main()
