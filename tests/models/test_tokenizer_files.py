"""The offline Gemma-style tokenizer: real control ids, Gemma 4 chat template, byte fallback, exact reference ids."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from models.tokenizer_files import write_tokenizer

TINY, FULL = 2048, 262144
SIZES = [TINY, FULL]
CONTROL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
IMAGE_IDS = {"<|image>": 255999, "<|image|>": 258880, "<image|>": 258882}
PROMPT = "Write a long essay about Portugal."
# Spec section 7: the real tokenizer's ids for PROMPT with the default (thinking off) chat template.
REFERENCE_IDS = [
    *[2, 105, 2364, 107],  # <bos> <|turn> user \n
    *[6974, 496, 1440, 20494, 1003, 23613, 236761],  # Write ▁a ▁long ▁essay ▁about ▁Portugal .
    *[106, 107, 105, 4368, 107, 100, 45518, 107, 101],  # <turn|> \n <|turn> model \n <|channel> thought \n <channel|>
]
THINKING_OFF = "<bos><|turn>user\n{}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
THINKING_ON = "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n{}<turn|>\n<|turn>model\n"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = {}
    for size in SIZES:
        out[size] = tmp_path_factory.mktemp(f"tokenizer{size}")
        write_tokenizer(out[size], size)
    return out


@pytest.fixture(scope="module")
def toks(dirs: dict[int, Path]) -> dict[int, PreTrainedTokenizerBase]:
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so patch its constant as well as the environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert huggingface_hub.constants.is_offline_mode()
        return {size: AutoTokenizer.from_pretrained(path) for size, path in dirs.items()}


def chat_text(tok: PreTrainedTokenizerBase, messages: list[dict], **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def chat_ids(tok: PreTrainedTokenizerBase, messages: list[dict], **kwargs) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("size", SIZES)
def test_loads_offline_as_gemma_tokenizer_with_real_control_ids(toks, size):
    tok = toks[size]
    assert type(tok).__name__ == "GemmaTokenizer"
    assert len(tok) == size
    for token, token_id in CONTROL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.encode(token) == [token_id]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.encode("\n") == [107]
    assert tok.convert_ids_to_tokens(107) == "\n"


def test_image_tokens_exist_only_in_the_full_vocabulary(toks):
    for token, token_id in IMAGE_IDS.items():
        assert toks[FULL].convert_tokens_to_ids(token) == token_id
        assert token not in toks[TINY].get_vocab()
    assert (toks[FULL].boi_token, toks[FULL].image_token_id, toks[FULL].eoi_token) == ("<|image>", 258880, "<image|>")


@pytest.mark.parametrize("size", SIZES)
def test_plain_encode_adds_no_bos(toks, size):
    tok = toks[size]
    assert tok.encode("") == []
    assert tok.encode("Hello there")[0] != tok.bos_token_id
    assert tok("Hello there").input_ids == tok.encode("Hello there", add_special_tokens=False)


def test_reference_prompt_matches_spec_ids_at_full_size(toks):
    tok = toks[FULL]
    assert chat_ids(tok, [{"role": "user", "content": PROMPT}]) == REFERENCE_IDS
    assert [tok.encode(word) for word in ("user", "model", "thought")] == [[2364], [4368], [45518]]


@pytest.mark.parametrize("size", SIZES)
def test_chat_template_thinking_off_prefills_empty_thought_channel(toks, size):
    tok = toks[size]
    messages = [{"role": "user", "content": PROMPT}]
    assert chat_text(tok, messages) == THINKING_OFF.format(PROMPT)
    ids = chat_ids(tok, messages)
    assert ids == tok.encode(THINKING_OFF.format(PROMPT))
    model, thought = tok.encode("model"), tok.encode("thought")
    assert ids[:2] == [2, 105]
    assert ids[-(len(model) + len(thought) + 7) :] == [106, 107, 105, *model, 107, 100, *thought, 107, 101]


@pytest.mark.parametrize("size", SIZES)
def test_chat_template_thinking_on_opens_system_turn_with_think_token(toks, size):
    tok = toks[size]
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    assert chat_text(tok, messages, enable_thinking=True) == THINKING_ON.format(PROMPT)
    system, user, model = tok.encode("system"), tok.encode("user"), tok.encode("model")
    expected = [2, 105, *system, 107, 98, 107, 106, 107, 105, *user, 107, *tok.encode(PROMPT), 106, 107]
    assert chat_ids(tok, messages, enable_thinking=True) == [*expected, 105, *model, 107]


def test_system_and_developer_messages_become_the_leading_system_turn(toks):
    tok = toks[TINY]
    system = {"role": "system", "content": "  Be brief.  "}
    user = {"role": "user", "content": " Hi "}
    assert chat_text(tok, [system, user]) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert chat_text(tok, [system, user], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    developer = {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}
    assert chat_text(tok, [developer, user]).startswith("<bos><|turn>system\nBebrief.<turn|>\n<|turn>user\n")


def test_earlier_model_turns_render_without_their_thought_channel(toks):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hello! "},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    assert chat_text(toks[TINY], messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nAgain<turn|>\n<|turn>model\n"
    )


def test_tool_results_continue_the_model_turn_and_orphans_render_nothing(toks):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"b": [1, True], "a": "x"}}}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": " 42 "}]  # fmt: skip
    assert chat_text(toks[TINY], messages) == (
        '<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|tool_call>call:f{a:<|"|>x<|"|>,b:[1,true]}<tool_call|>'
        '<|tool_response>response:f{value:<|"|> 42 <|"|>}<tool_response|>'
    )
    assert chat_text(toks[TINY], messages[:2]).endswith("<tool_call|><|tool_response>")  # awaiting the result
    orphan = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "c9", "content": "42"}]
    assert "42" not in chat_text(toks[TINY], orphan)


ROUND_TRIP_TEXTS = [
    "Hello, world! How are you today?",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "日本語のテキストと中文字符",
    "emoji 🙂👍🏽 and é, ß, ø",
    '<|turn>user\n<|"|>quoted<|"|><turn|><|tool_call>call:f{}<tool_call|><bos><eos>',
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_then_decode_returns_the_text(toks, size, text):
    tok = toks[size]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("size", SIZES)
def test_characters_outside_the_vocab_use_byte_fallback(toks, size):
    tok = toks[size]
    assert tok.convert_ids_to_tokens(tok.encode("你")) == ["<0xE4>", "<0xBD>", "<0xA0>"]
    assert tok.convert_ids_to_tokens(tok.encode("\t")) == ["<0x09>"]
    # Ordinary English is made of multi-character pieces, not single characters.
    assert len(tok.encode("The weather was warm and the answer was clear.")) < 20


@pytest.mark.parametrize("size", SIZES)
def test_a_prefix_of_a_characters_byte_tokens_does_not_decode_to_it(toks, size):
    # Incremental detokenisation relies on this: a partial UTF-8 sequence decodes to U+FFFD, never to the character.
    tok = toks[size]
    ids = tok.encode("Portugal 🙂")
    assert tok.convert_ids_to_tokens(ids[-4:]) == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    for cut in range(1, 4):
        partial = tok.decode(ids[: len(ids) - cut])
        assert "🙂" not in partial
        assert partial.endswith("\ufffd")
    assert tok.decode(ids) == "Portugal 🙂"


def test_skipping_special_tokens_drops_tool_call_markers(toks):
    tok = toks[TINY]
    ids = tok.encode('<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>')
    assert tok.decode(ids, skip_special_tokens=True) == "call:f{a:x}"
    assert tok.decode(ids) == '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>'


@pytest.mark.parametrize("size", SIZES)
def test_tokenizers_library_reads_the_file_the_same_way(dirs, toks, size):
    raw = Tokenizer.from_file(str(dirs[size] / "tokenizer.json"))
    for text in [*ROUND_TRIP_TEXTS, THINKING_OFF.format(PROMPT)]:
        assert raw.encode(text).ids == toks[size].encode(text)


@pytest.mark.parametrize("size", SIZES)
def test_writing_is_deterministic(dirs, tmp_path, size):
    write_tokenizer(tmp_path, size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (dirs[size] / name).read_bytes()


def test_too_small_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        write_tokenizer(tmp_path, 512)
