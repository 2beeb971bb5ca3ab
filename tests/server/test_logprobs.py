"""Logprobs through the official `openai` client against a live demo server (its replies are text): one entry per
output token (the stop token last), finite and <= 0, top alternatives sorted and at most k, the entries spelling the
text, streamed chunks carrying the entries of their deltas; bad values are 400s naming the parameter."""

from __future__ import annotations

import math

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
DEMO = {"model": "tiny", "seed": 7, "extra_body": {"diffusion": {"steps": 8}}}  # few steps: the demo settles fast


def check_entries(entries, k: int) -> None:
    for entry in entries:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == k and top == sorted(top, reverse=True)
        assert all(math.isfinite(v) and v <= 0 for v in top)


def spelled(server, entries, finish_reason: str) -> str:
    """The text the entries' bytes spell: less the stop token's entry when the reply ended at one, and less special
    tokens (padding a canvas past the reply's end), which text leaves out."""
    if finish_reason == "stop":
        entries = entries[:-1]
    with server.http() as http:
        special = set(http.get("/tokenizer_info").json()["special_tokens"])
    return bytes(b for entry in entries if entry.token not in special for b in entry.bytes).decode()


def test_chat_logprobs(demo_server):
    response = demo_server.client().chat.completions.create(
        messages=MESSAGES, max_tokens=48, logprobs=True, top_logprobs=3, **DEMO
    )
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens > 0
    check_entries(entries, 3)
    assert spelled(demo_server, entries, choice.finish_reason) == choice.message.content
    if choice.finish_reason == "stop":
        assert entries[-1].token in ("<eos>", "<turn|>")  # the stop token's entry


def test_streamed_chat_chunks_carry_their_entries(demo_server):
    stream = demo_server.client().chat.completions.create(
        messages=MESSAGES, max_tokens=60, logprobs=True, stream=True, stream_options={"include_usage": True},
        model="tiny", seed=7, extra_body={"diffusion": {"steps": 8, "stream_prefix": True}},
    )  # fmt: skip
    entries, text, usage, finish, chunks = [], "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            chunks += bool(choice.logprobs and choice.logprobs.content)
            text += choice.delta.content or ""
            entries += choice.logprobs.content if choice.logprobs else []
            finish = choice.finish_reason or finish
    assert len(entries) == usage.completion_tokens and chunks >= 2  # a settled prefix, then the rest of the canvas
    check_entries(entries, 0)
    assert spelled(demo_server, entries, finish) == text


def test_completion_logprobs_legacy_shape(demo_server):
    client = demo_server.client()
    response = client.completions.create(prompt="The sea is", max_tokens=20, logprobs=2, **DEMO)
    choice = response.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == response.usage.completion_tokens
    assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    with demo_server.http() as http:
        special = set(http.get("/tokenizer_info").json()["special_tokens"])
    shown = lp.tokens[:-1] if choice.finish_reason == "stop" else lp.tokens  # less the stop token
    assert "".join(t for t in shown if t not in special) == choice.text  # English: no byte-fallback tokens
    stream = client.completions.create(prompt="The sea is", max_tokens=20, logprobs=2, stream=True, **DEMO)
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens  # the same seed: the same tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_responses_logprobs_streamed_and_not(demo_server):
    client = demo_server.client()
    kwargs = {
        "model": "tiny",
        "input": "Tell me about the sea.",
        "max_output_tokens": 40,
        "top_logprobs": 2,
        "include": ["message.output_text.logprobs"],
        "extra_body": {"seed": 7, "diffusion": {"steps": 8}},
    }
    response = client.responses.create(**kwargs)
    part = response.output[0].content[0]
    assert len(part.logprobs) == response.usage.output_tokens > 0
    check_entries(part.logprobs, 2)
    assert spelled(demo_server, part.logprobs, "length" if response.status == "incomplete" else "stop") == part.text
    deltas, done = [], None
    for event in client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta":
            deltas += event.logprobs
        elif event.type == "response.completed" or event.type == "response.incomplete":
            done = event.response
    assert [e.logprob for e in deltas] == [e.logprob for e in part.logprobs]  # the same seed, the same entries
    assert done.output[0].content[0].logprobs == part.logprobs


BAD = [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"logprobs": 1, "echo": True}, "echo"),
    ("responses", {"top_logprobs": 21}, "top_logprobs"),
    ("responses", {"include": ["reasoning.encrypted_content"]}, "include"),
]


def test_bad_logprobs_are_400s_naming_the_parameter(demo_server):
    client = demo_server.client()
    for path, body, param in BAD:
        with pytest.raises(openai.BadRequestError) as info:
            if path == "chat":
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=body)
            elif path == "responses":
                client.responses.create(model="tiny", input="x", max_output_tokens=4, extra_body=body)
            else:
                client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=body)
        assert info.value.body["param"] == param, (body, info.value.body)
    assert client.completions.create(prompt="x", max_tokens=2, **DEMO).choices  # still serving
