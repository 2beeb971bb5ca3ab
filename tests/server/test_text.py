"""server.text on the offline Gemma-style tokenizer: streamed text equals one-shot text, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from models.tokenizer_files import write_tokenizer
from server.text import (
    IncrementalDetokenizer,
    OutputText,
    ReasoningSplitter,
    StopStrings,
    TextDelta,
    Tokenizer,
)

# ASCII pieces, tabs, and CJK / accents / emoji (including a ZWJ sequence) that only byte fallback can spell.
MIXED = "Write about Portugal.\tIt has 12 cities: 東京 is not one; São Paulo neither. 🎉👩‍💻 ok\n\nend — 世界!"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path, 2048)
    return Tokenizer(path)


def chunks(items: list, rng: random.Random, max_size: int = 5) -> list[list]:
    """Split `items` at random points (pieces of 0..max_size, so empty pushes happen too)."""
    out, i = [], 0
    while i < len(items):
        size = rng.randint(0, max_size)
        out.append(items[i : i + size])
        i += size
    return out


def stream_text(tok: Tokenizer, ids: list[int], pieces: list[list[int]], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    assert [i for piece in pieces for i in piece] == ids
    return [detok.push(piece) for piece in pieces] + [detok.flush()]


# --- Tokenizer -------------------------------------------------------------------------------------------------------


def test_encode_adds_no_bos_and_recognises_special_token_strings(tok):
    ids = tok.encode("<|channel>hi<channel|><turn|>")
    assert ids[0] == 100 and ids[-2:] == [101, 106] and 2 not in ids
    assert tok.decode(ids) == "hi" and tok.decode(ids, skip_special_tokens=False) == "<|channel>hi<channel|><turn|>"
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert {"<eos>", "<pad>", "<turn|>", "<|channel>", '<|"|>'} <= tok.special_tokens
    assert tok.vocab_size == 2048 and tok.name_or_path
    info = tok.info()
    assert info["vocab_size"] == 2048 and info["eos_token"] == "<eos>" and "<|turn>model" in info["chat_template"]
    assert "<turn|>" in info["special_tokens"] and info["tokenizer_class"] == "GemmaTokenizer"


def test_chat_prompt_thinking_off_matches_the_documented_prompt(tok):
    ids = tok.chat_prompt_ids([{"role": "user", "content": "Write a long essay about Portugal."}], False)
    expected = (
        "<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert ids == tok.encode(expected)
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids[-1] == 101
    assert tok.decode(ids, skip_special_tokens=False) == expected


def test_chat_prompt_thinking_on_with_list_content_and_system(tok):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "世界"}]
    ids = tok.chat_prompt_ids([{"role": "user", "content": parts}], enable_thinking=True)
    expected = "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello世界<turn|>\n<|turn>model\n"
    assert tok.decode(ids, skip_special_tokens=False) == expected and ids == tok.encode(expected)

    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nhmm<channel|>Hello"}]},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert tok.decode(tok.chat_prompt_ids(messages, False), skip_special_tokens=False) == expected


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "function", "content": "42"}], r"messages\[0\]: role must be one of .*'function'"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]: role must be one of"),
        ([], "must not be empty"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"role": "user", "content": 5}], "content must be a string or a list of text parts"),
        ([{"role": "user"}], "content must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\].*'image_url'"),
    ],
)
def test_chat_prompt_rejects_what_the_template_cannot_render(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        tok.chat_prompt_ids(messages, enable_thinking=False)


# --- IncrementalDetokenizer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_streamed_text_equals_one_shot_decode(tok, seed):
    rng = random.Random(seed)
    skip = seed % 2 == 0
    text = MIXED + "<turn|>" + MIXED[::-1] + "<eos>"
    ids = tok.encode(text)
    deltas = stream_text(tok, ids, chunks(ids, rng, max_size=rng.choice([1, 3, 8, 40])), skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in delta for delta in deltas)


def test_one_token_at_a_time_never_splits_a_character(tok):
    ids = tok.encode(MIXED)
    byte_tokens = sum(tok.decode([i]) == "\ufffd" for i in ids)
    assert byte_tokens > 20  # the text really goes through byte fallback, so single tokens cut characters
    deltas = stream_text(tok, ids, [[i] for i in ids])
    assert "".join(deltas) == MIXED and not any("\ufffd" in delta for delta in deltas)


def test_cut_character_is_held_until_complete_and_flushed_as_replacement(tok):
    ids = tok.encode("a世")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:2]) == "a"
    assert detok.push(ids[2:3]) == ""
    assert detok.push(ids[3:]) == "世"
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:-1]) == "a" and detok.flush() == "\ufffd\ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_odd_byte_runs_stream_like_one_shot(tok, skip):
    """A genuine U+FFFD, and a special token inside a byte run (dropped first when skipping specials)."""
    e4, b8, b96 = tok.encode("世")
    for ids in [tok.encode("x\ufffd\ufffdy"), [*tok.encode("a"), e4, 1, b8, b96, *tok.encode("z")]]:
        for size in (1, 2, 3):
            deltas = stream_text(tok, ids, [ids[i : i + size] for i in range(0, len(ids), size)], skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (ids, size)


def test_invalid_bytes_settle_without_rewriting_emitted_text(tok):
    cut, whole = tok.encode("世"), tok.encode("界")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(cut) == "世"
    assert detok.push(whole[:2]) == ""
    assert detok.push(tok.encode("a")) == "\ufffd\ufffda"  # only the broken character's bytes become U+FFFD


def test_decodes_a_sliding_window_not_the_whole_output(tok):
    decoded = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode(MIXED * 40)
    blocks = [ids[i : i + 256] for i in range(0, len(ids), 256)]
    assert len(blocks) > 10
    deltas = stream_text(Counting(), ids, blocks)
    assert "".join(deltas) == MIXED * 40
    assert max(decoded) <= 2 * 256 + 8 and sum(decoded) <= 4 * len(ids)


# --- StopStrings -----------------------------------------------------------------------------------------------------


def run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool, str | None]:
    matcher, out = StopStrings(stops), []
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True, matcher.matched
    return "".join(out) + matcher.flush(), False, matcher.matched


def all_chunkings(text: str, rng: random.Random) -> list[list[str]]:
    """One piece, every two-piece split, one character at a time, and a few random splits."""
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    return out + [["".join(c) for c in chunks(list(text), rng, 4)] for _ in range(10)]


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (["STOP"], "hello STOP world", ("hello ", True, "STOP")),
        (["STOP"], "STOP at once", ("", True, "STOP")),
        (["STOP"], "no stop here, ST", ("no stop here, ST", False, None)),  # held tail released by flush
        (["world", "lo w"], "hello world", ("hel", True, "lo w")),  # the stop completed first wins
        (["x", "hello"], "say hello x", ("say ", True, "hello")),
        (["abc", "ab"], "xxabcd", ("xx", True, "ab")),  # overlapping prefixes: "ab" completes first
        (["bcd", "abcd"], "zabcde", ("z", True, "abcd")),  # both end together: cut at the earlier start
        (["aab"], "aaab", ("a", True, "aab")),  # a held tail that is not the one that matches
        (["\n\n", "世界"], "東京世界\n\n", ("東京", True, "世界")),
        ([], "passthrough STOP", ("passthrough STOP", False, None)),
        ([""], "empty stops are ignored", ("empty stops are ignored", False, None)),
    ],
)
def test_stop_strings_give_the_same_result_for_every_chunking(stops, text, expected):
    for pieces in all_chunkings(text, random.Random(0)):
        assert run_stops(stops, pieces) == expected, pieces


def test_stop_string_straddling_two_pushes_and_nothing_after_it():
    matcher = StopStrings(["</answer>", "END"])
    assert matcher.push("The answer is 4</ans") == ("The answer is 4", False)
    assert matcher.push("wer> and more") == ("", True) and matcher.matched == "</answer>"
    assert matcher.push("even more") == ("", True) and matcher.flush() == ""


def test_held_tail_is_released_when_it_stops_being_a_prefix():
    matcher = StopStrings(["STOP"])
    assert matcher.push("a S") == ("a ", False)
    assert matcher.push("T") == ("", False)
    assert matcher.push("ay") == ("STay", False)
    assert matcher.flush() == "" and matcher.matched is None


# --- ReasoningSplitter -----------------------------------------------------------------------------------------------


def split_all(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    deltas = [splitter.push(piece) for piece in pieces] + [splitter.flush()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


SPECIALS = ["<eos>", "<pad>", "<turn|>", "<|turn>", '<|"|>', "<bos>"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<|channel>thought\nLet me think.\n<channel|>The answer is 4.<turn|>",
            ("Let me think.\n", "The answer is 4."),
        ),
        ("The answer is 4.<turn|><eos><pad><pad>", ("", "The answer is 4.")),  # thinking off: no markers
        ('<|channel>thought\nsay <|"|>x<|"|><channel|>a < b<eos>', ("say x", "a < b")),
        ("<|channel>thoughtful<channel|>ok", ("thoughtful", "ok")),  # no header to strip
        ("<|channel>thought\n<channel|>thought\n is content", ("", "thought\n is content")),
        ("<|channel>thought\nstill thinking when cut off <ch", ("still thinking when cut off <ch", "")),
        ("<|channel>thou", ("", "")),  # cut off inside the header
        ("<channel|>stray close <|turn>", ("", "stray close ")),
    ],
)
def test_reasoning_split_is_the_same_for_every_chunking(text, expected):
    for pieces in all_chunkings(text, random.Random(1)):
        assert split_all(ReasoningSplitter(SPECIALS), pieces) == expected, pieces


def test_reasoning_markers_straddling_pushes_are_held_back():
    splitter = ReasoningSplitter(SPECIALS)
    assert splitter.push("<|chan") == ("", "")
    assert splitter.push("nel>thou") == ("", "")
    assert splitter.push("ght\nHmm<chan") == ("Hmm", "")
    assert splitter.push("nel|>Yes<tu") == ("", "Yes")
    assert splitter.push("rn|>") == ("", "")
    assert splitter.flush() == ("", "")


# --- OutputText ------------------------------------------------------------------------------------------------------


def stream_output(output: OutputText, ids: list[int], rng: random.Random) -> TextDelta:
    deltas = [output.push(piece) for piece in chunks(ids, rng, 6)] + [output.flush()]
    hits = [i for i, d in enumerate(deltas) if d.stopped]
    if hits:  # once stopped, every later delta is empty
        assert all(d == TextDelta(stopped=True) for d in deltas[hits[0] + 1 :])
    assert not any("\ufffd" in d.content + d.reasoning for d in deltas)
    return TextDelta("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas), bool(hits))


THOUGHTFUL = "<|channel>thought\nSTOP is not applied to 東京 reasoning.<channel|>Answer 🎉 STOP after<turn|><eos>"


@pytest.mark.parametrize("seed", range(5))
def test_output_text_applies_stops_to_content_only(tok, seed):
    ids, rng = tok.encode(THOUGHTFUL), random.Random(seed)
    output = OutputText(tok, ["STOP"], split_reasoning=True)
    expected = TextDelta("Answer 🎉 ", "STOP is not applied to 東京 reasoning.", True)
    assert stream_output(output, ids, rng) == expected and output.matched_stop == "STOP"


@pytest.mark.parametrize("seed", range(5))
def test_output_text_without_stops_or_split_gives_the_one_shot_decode(tok, seed):
    ids, rng = tok.encode(THOUGHTFUL + MIXED), random.Random(seed)
    plain = OutputText(tok, ["never"], split_reasoning=False)
    assert stream_output(plain, ids, rng) == TextDelta(tok.decode(ids), "", False)
    assert plain.matched_stop is None
    split = OutputText(tok, [], split_reasoning=True)
    reasoning = "STOP is not applied to 東京 reasoning."
    assert stream_output(split, ids, rng) == TextDelta("Answer 🎉 STOP after" + MIXED, reasoning, False)


def test_output_text_stop_ends_the_stream_and_drops_reasoning_after_it(tok):
    output = OutputText(tok, ["Done."], split_reasoning=True)
    delta = output.push(tok.encode("Done. <|channel>thought\nlater<channel|>more"))
    assert delta == TextDelta("", "", True) and output.matched_stop == "Done."
    assert output.push(tok.encode("x")) == TextDelta(stopped=True) and output.flush() == TextDelta(stopped=True)


def test_output_text_stop_on_a_character_cut_across_blocks(tok):
    ids = tok.encode("ab 世")
    output = OutputText(tok, ["世"], split_reasoning=False)
    assert output.push(ids[:-1]) == TextDelta("ab ")
    assert output.push(ids[-1:]) == TextDelta("", "", True) and output.matched_stop == "世"


def test_output_text_stop_completed_by_text_released_at_flush(tok):
    output = OutputText(tok, ["b <"], split_reasoning=True)
    assert output.push(tok.encode("a b <")) == TextDelta("a ")  # "<" may start a special token, "b " a stop
    assert output.flush() == TextDelta("", "", True) and output.matched_stop == "b <"
