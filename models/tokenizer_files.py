"""Offline tokenizer files that stand in for DiffusionGemma's Gemma 4 tokenizer (see shared/tokenizer.md).

Control ids, byte fallback, the chat template and a few pinned pieces match the real tokenizer; the rest of the
vocabulary is a small BPE learned from a built-in corpus, padded with `<unusedN>` filler up to `vocab_size`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from functools import cache
from itertools import pairwise
from pathlib import Path

# Gemma 4 chat format, written after the large-variant chat_template.jinja (gemma-4-26B-A4B-it): user text is trimmed,
# earlier model turns lose their <|channel>...<channel|> spans, and with thinking off the generation prompt pre-fills
# an empty thought channel. Tools are declared in the system turn as `<|tool>declaration:NAME{description:...,
# parameters:{properties:{...},required:[...],type:<|"|>OBJECT<|"|>}}<tool|>`; an assistant's calls are
# `<|tool_call>call:NAME{key:VALUE,...}<tool_call|>` with keys in order, strings between <|"|> tokens; the tool
# messages that answer them follow in the same model turn as `<|tool_response>response:NAME{value:<|"|>...<|"|>}
# <tool_response|>`, and generation then continues that turn (no new generation prompt).
CHAT_TEMPLATE = r"""
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(out='') -%}
    {%- for chunk in text.split('<channel|>') -%}
        {%- set ns.out = ns.out + chunk.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- ns.out | trim -}}
{%- endmacro -%}
{%- macro render(content, role) -%}
    {%- if content is string -%}
        {%- set texts = [content] -%}
    {%- elif content -%}
        {%- set texts = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | list -%}
    {%- else -%}
        {%- set texts = [] -%}
    {%- endif -%}
    {%- for text in texts -%}
        {{- strip_thinking(text) if role == 'model' else text | trim -}}
    {%- endfor -%}
{%- endmacro -%}
{%- macro value(v) -%}
    {%- if v is string -%}{{- '<|"|>' + v + '<|"|>' -}}
    {%- elif v is boolean -%}{{- 'true' if v else 'false' -}}
    {%- elif v is none -%}{{- 'null' -}}
    {%- elif v is mapping -%}{{- '{' -}}
        {%- for key, item in v | dictsort -%}{{- key + ':' + value(item) -}}{{- ',' if not loop.last -}}{%- endfor -%}
        {{- '}' -}}
    {%- elif v is sequence -%}{{- '[' -}}
        {%- for item in v -%}{{- value(item) -}}{{- ',' if not loop.last -}}{%- endfor -%}
        {{- ']' -}}
    {%- else -%}{{- v | string -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro schema(s) -%}
    {%- set ns = namespace(parts=[]) -%}
    {%- if s.description -%}{%- set ns.parts = ns.parts + ['description:' + value(s.description)] -%}{%- endif -%}
    {%- if s.enum -%}{%- set ns.parts = ns.parts + ['enum:' + value(s.enum)] -%}{%- endif -%}
    {%- if s['items'] is mapping and s['items'] -%}
        {%- set ns.parts = ns.parts + ['items:{' + schema(s['items']) + '}'] -%}
    {%- endif -%}
    {%- if s.properties is mapping -%}
        {%- set ns.parts = ns.parts + ['properties:{' + properties(s.properties) + '}'] -%}
    {%- endif -%}
    {%- if s.required -%}{%- set ns.parts = ns.parts + ['required:' + value(s.required)] -%}{%- endif -%}
    {%- if s.nullable -%}{%- set ns.parts = ns.parts + ['nullable:true'] -%}{%- endif -%}
    {%- if s.type -%}{%- set ns.parts = ns.parts + ['type:' + value(s.type | upper)] -%}{%- endif -%}
    {{- ns.parts | join(',') -}}
{%- endmacro -%}
{%- macro properties(props) -%}
    {%- for key, s in props | dictsort -%}{{- key + ':{' + schema(s) + '}' -}}{{- ',' if not loop.last -}}{%- endfor -%}
{%- endmacro -%}
{%- macro declaration(function) -%}
    {{- '<|tool>declaration:' + function.name + '{description:' + value(function.description or '') -}}
    {%- if function.parameters -%}{{- ',parameters:{' + schema(function.parameters) + '}' -}}{%- endif -%}
    {{- '}<tool|>' -}}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set turns = messages -%}
{%- set ns = namespace(last=None, previous_role=None) -%}
{{- bos_token -}}
{%- if thinking or tools or messages[0].role in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\n' -}}
    {%- endif -%}
    {%- if messages[0].role in ['system', 'developer'] -%}
        {{- render(messages[0].content, 'system') -}}
        {%- set turns = messages[1:] -%}
    {%- endif -%}
    {%- for tool in tools or [] -%}
        {{- declaration(tool.function) -}}
    {%- endfor -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in turns -%}
    {%- if message.role != 'tool' -%}
        {%- set role = {'assistant': 'model', 'developer': 'system'}.get(message.role, message.role) -%}
        {%- if not (role == 'model' and ns.previous_role == 'assistant' and ns.last == 'tool_response') -%}
            {{- '<|turn>' + role + '\n' -}}
        {%- endif -%}
        {%- set ns.last, ns.previous_role = None, message.role -%}
        {%- for call in message.tool_calls or [] -%}
            {{- '<|tool_call>call:' + call.function.name + value(call.function.arguments) + '<tool_call|>' -}}
            {%- set ns.last = 'tool_call' -%}
        {%- endfor -%}
        {%- if message.tool_calls -%}
            {%- for answer in turns[loop.index0 + 1:] -%}
                {%- if answer.role != 'tool' -%}{%- break -%}{%- endif -%}
                {%- set names = message.tool_calls | selectattr('id', 'equalto', answer.tool_call_id) | list -%}
                {%- set name = names[0].function.name if names else (answer.name or 'unknown') -%}
                {%- set body = answer.content if answer.content is string else (answer.content or [])
                    | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
                {{- '<|tool_response>response:' + name + '{value:' + value(body) -}}
                {{- '}<tool_response|>' -}}
                {%- set ns.last = 'tool_response' -%}
            {%- endfor -%}
        {%- endif -%}
        {{- render(message.content, role) -}}
        {%- if ns.last == 'tool_call' -%}
            {{- '<|tool_response>' -}}
        {%- elif not (ns.last == 'tool_response' and not message.content) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.last not in ['tool_call', 'tool_response'] -%}
    {{- '<|turn>model\n' -}}
    {%- if not thinking -%}
        {{- '<|channel>thought\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

_CONTROL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
# boi, soft token, eoi; only written when the vocabulary reaches them, as in the real 262,144-entry one.
_IMAGE_TOKENS = {255999: "<|image>", 258880: "<|image|>", 258882: "<image|>"}
_IMAGE_TOKEN_KEYS = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>"}

# Text pieces at their real ids: the template's role words and every piece of the spec's reference prompt, so that
# "Write a long essay about Portugal." reproduces the spec's ids at the full vocabulary size.
_PINNED_PIECES = {
    "\n": 107,
    "▁a": 496,
    "▁about": 1003,
    "▁long": 1440,
    "user": 2364,
    "model": 4368,
    "Write": 6974,
    "▁essay": 20494,
    "▁Portugal": 23613,
    "thought": 45518,
    ".": 236761,
}
_FIRST_TEXT_ID = 108  # ids below are Gemma's control region: control tokens, "\n", `<unusedN>` elsewhere
_BASE_CHARS = ["\n", "▁", *map(chr, range(0x21, 0x7F))]  # ASCII never needs byte fallback; tabs and the rest do

_CORPUS = """\
The model reads a prompt, writes a long answer and stops at the end of its turn. A good answer is clear, short where
it can be and long where it must be. People ask about history, science, cooking, travel, music and the weather, and
they expect the model to know something about each of them. Write a short story about a small town by the sea.
Write an essay about the history of Portugal, its language, its long coast and the ships that sailed from Lisbon to
India, Brazil and Africa. The country has mountains in the north, warm beaches in the south and many old cities.
Explain how a tokenizer splits text into pieces: common words become single tokens, rare words become several
pieces, and characters that are not in the vocabulary fall back to their bytes. The server streams tokens to the
client as soon as they are committed, so every character must decode the same way in parts and as a whole.
What is the weather like today? It was raining in the morning, but the afternoon was bright and warm. Could you
help me plan a trip to the mountains next summer? We would like to walk every day, eat well and sleep in small
hotels. Thank you for the help; that sounds like a wonderful plan, and I will write again when we come back home.
Numbers such as 12, 345 and 2024 are read one digit at a time. Questions, answers, lists and tables are all text.
"""


def _words(text: str) -> Counter[tuple[str, ...]]:
    """Split like SentencePiece: a word keeps its leading space as "▁"; digits and punctuation stand alone."""
    return Counter(tuple(w.replace(" ", "▁")) for w in re.findall(r" ?[A-Za-z]+|\d|[^\sA-Za-z\d]", text))


def _apply(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


@cache
def _learned_merges() -> tuple[tuple[str, str], ...]:
    """Greedy BPE on the corpus until every word is one piece; ties go to the smaller pair, so the output is fixed."""
    words = _words(_CORPUS)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_apply(word, best): count for word, count in words.items()})
    return tuple(merges)


def _segment(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """What BPE makes of `piece`: repeatedly merge the lowest-ranked adjacent pair, leftmost first."""
    symbols = list(piece)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _merges_with_pins(pins: dict[str, int]) -> list[tuple[str, str]]:
    """Learned merges, then for each pinned piece a left-to-right chain that joins whatever BPE leaves of it."""
    merges = list(_learned_merges())
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for piece in pins:
        parts = _segment(piece, ranks)
        for i in range(1, len(parts)):
            pair = ("".join(parts[:i]), parts[i])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
    return merges


def _layout(vocab_size: int) -> tuple[list[str], list[tuple[str, str]], dict[int, str]]:
    """Id -> piece for every id, the merges, and the added (special) tokens by id."""
    added = dict(_CONTROL_TOKENS)
    if vocab_size > max(_IMAGE_TOKENS):
        added.update(_IMAGE_TOKENS)
    pins = {piece: i for piece, i in _PINNED_PIECES.items() if i < vocab_size}
    merges = _merges_with_pins(pins)

    pieces: list[str | None] = [None] * vocab_size
    for i, token in added.items():
        pieces[i] = token
    for piece, i in pins.items():
        pieces[i] = piece
    placed = set(added.values()) | set(pins)
    wanted = [f"<0x{b:02X}>" for b in range(256)] + _BASE_CHARS + [a + b for a, b in merges]
    free = (i for i in range(_FIRST_TEXT_ID, vocab_size) if pieces[i] is None)
    for piece in wanted:
        if piece in placed:
            continue
        i = next(free, None)
        if i is None:
            raise ValueError(f"vocab_size {vocab_size} is too small for the control tokens, bytes and merges")
        pieces[i] = piece
        placed.add(piece)

    # Filler stays out of the added-token list: hundreds of thousands of added tokens make loading slow.
    unused = iter(range(vocab_size))
    return [piece if piece is not None else f"<unused{next(unused)}>" for piece in pieces], merges, added


def write_tokenizer(directory: str | os.PathLike, vocab_size: int) -> None:
    """Write offline tokenizer files (tokenizer.json, tokenizer_config.json) that behave like DiffusionGemma's."""
    pieces, merges, added = _layout(vocab_size)
    # transformers 5 rebuilds GemmaTokenizer's normalizer, pre-tokenizer and decoder in code and keeps only the
    # vocabulary, merges and added tokens from this file; the pipeline below is the same, so `tokenizers` alone agrees.
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, token in sorted(added.items())
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": None,  # no <bos> on plain encode: the chat template writes it
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {piece: i for i, piece in enumerate(pieces)},
            "merges": [list(pair) for pair in merges],
        },
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    write_tokenizer_config(path, vocab_size)


def write_tokenizer_config(directory: str | os.PathLike, vocab_size: int) -> None:
    """Write tokenizer_config.json (special tokens, the chat template) for a vocabulary of `vocab_size`; the demo
    checkpoint's comes from here too, so that every checkpoint we ship renders chats alike."""
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": False,  # cleanup would turn "a ." into "a." and break round trips
        **(_IMAGE_TOKEN_KEYS if vocab_size > max(_IMAGE_TOKENS) else {}),
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(directory) / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8"
    )
