"""/v1/chat/completions through the official OpenAI client against a live server."""

from __future__ import annotations

import openai
import pytest

FAST = {"diffusion": {"steps": 2}}


def test_chat_returns_an_openai_chat_completion(client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, seed=1, extra_body=FAST
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.refusal is None and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 24


def test_prompt_tokens_match_the_chat_template(client, server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, extra_body=FAST)
    with server.http() as http:
        tokenized = http.post("/tokenize", json={"messages": messages}).json()
    assert out.usage.prompt_tokens == tokenized["count"]
    assert tokenized["tokens"][:2] == [2, 105] and tokenized["tokens"][-1] == 101  # empty thought channel


def test_streaming_chat_role_first_finish_last(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, seed=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **FAST},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content in (None, "")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, seed=4,
        extra_body={"ignore_eos": True, **FAST},
    )  # fmt: skip
    assert streamed == whole.choices[0].message.content


def test_thinking_on_changes_the_prompt(client):
    base = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=FAST)
    off = client.chat.completions.create(**base)
    on = client.chat.completions.create(**{**base, "extra_body": {**FAST,
                                           "chat_template_kwargs": {"enable_thinking": True}}})  # fmt: skip
    assert on.usage.prompt_tokens != off.usage.prompt_tokens


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"top_p": 0.5}, "top_p"),
        ({"top_k": 5}, "top_k"),
    ],
)
def test_unsupported_chat_fields_are_a_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], extra_body=extra)
    assert err.value.param == param


def test_image_parts_are_refused_by_name(client):
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}])
    assert err.value.param == "messages[0].content" and "image_url" in err.value.message
