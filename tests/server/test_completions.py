"""/v1/completions through the official OpenAI client and raw HTTP against a live server."""

from __future__ import annotations

import json
import time

import openai
import pytest

SHORT = dict(model="tiny", max_tokens=20, extra_body={"diffusion": {"steps": 3}})


def test_string_prompt_returns_an_openai_completion(client):
    out = client.completions.create(prompt="Hello world", seed=3, **SHORT)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.completion_tokens <= 20


def test_max_tokens_is_exact_and_default_is_16(client):
    exact = client.completions.create(model="tiny", prompt="a b c", max_tokens=45, seed=1,
                                      extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    assert exact.choices[0].finish_reason == "length" and exact.usage.completion_tokens == 45
    default = client.completions.create(model="tiny", prompt="a b c", seed=1,
                                        extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    assert default.usage.completion_tokens == 16


def test_list_and_token_prompts_with_n_are_indexed_in_prompt_sample_order(client, server):
    out = client.completions.create(prompt=["one", "two"], n=2, seed=5, **SHORT)
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    ids = client.completions.create(prompt=[5, 6, 7], **SHORT)
    assert ids.usage.prompt_tokens == 3
    many = client.completions.create(prompt=[[5, 6, 7], [8, 9]], **SHORT)
    assert len(many.choices) == 2 and many.usage.prompt_tokens == 5


def test_same_seed_same_text_and_batch_invariant(client):
    kwargs = dict(prompt="The sea", seed=42, extra_body={"ignore_eos": True, "diffusion": {"steps": 3}},
                  model="tiny", max_tokens=40)  # fmt: skip
    first = client.completions.create(**kwargs).choices[0].text
    crowd = client.completions.create(**{**kwargs, "prompt": ["The sea", "A longer other prompt here"]})
    assert first == client.completions.create(**kwargs).choices[0].text
    assert crowd.choices[0].text == first  # seeded output is the same beside another prompt


def test_streaming_sends_one_chunk_per_block_then_usage_and_done(client, server):
    stream = client.completions.create(prompt="stream me", stream=True, stream_options={"include_usage": True},
                                       model="tiny", max_tokens=70, seed=2,
                                       extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert 1 <= len(text_chunks) <= 3  # 70 tokens = blocks of 32 + 32 + 6 on the tiny model, one chunk each
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 70
    joined = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(prompt="stream me", model="tiny", max_tokens=70, seed=2,
                                      extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    assert joined == whole.choices[0].text


def test_raw_sse_wire_format(server):
    with server.http() as http, http.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": "x", "max_tokens": 8, "stream": True, "diffusion": {"steps": 1},
    }) as response:  # fmt: skip
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    for payload in data[:-1]:
        assert json.loads(payload)["object"] == "text_completion"


def test_stop_string_cuts_the_text_exactly(client):
    base = dict(model="tiny", prompt="stop test", max_tokens=64, seed=9,
                extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    full = client.completions.create(**base).choices[0].text
    assert len(full) > 40
    stop = full[30:34]
    cut = client.completions.create(**base, stop=[stop, "never-there"]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(**base, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("echo", True, "echo"),
        ("best_of", 2, "best_of"),
        ("logit_bias", {"5": 10}, "logit_bias"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("top_p", 0.9, "top_p"),
    ],
)
def test_unsupported_fields_are_a_400_naming_the_param(client, field, value, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={field: value})
    assert err.value.status_code == 400 and err.value.param == param and err.value.code == "unsupported_parameter"


def test_vllm_extensions_are_accepted(client, server):
    out = client.completions.create(model="tiny", prompt="x", max_tokens=4,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.0, "min_tokens": 1,
                                                "diffusion": {"steps": 1}})  # fmt: skip
    assert out.usage.completion_tokens == 4
    assert "ignoring request fields outside the OpenAI schema: min_tokens, repetition_penalty" in server.logs()


def test_drafts_stream_only_when_asked(client, server):
    body = {"model": "tiny", "prompt": "draft", "max_tokens": 32, "stream": True,
            "diffusion": {"steps": 3, "stream_drafts": True}}  # fmt: skip
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    drafts = [json.loads(lines[i + 1].removeprefix("data: ")) for i, line in enumerate(lines) if line == "event: draft"]
    assert [d["step"] for d in drafts] == [1, 2, 3] and all(isinstance(d["text"], str) for d in drafts)
    plain = list(client.completions.create(model="tiny", prompt="draft", max_tokens=32, stream=True,
                                           extra_body={"diffusion": {"steps": 3}}))  # fmt: skip
    assert all(c.object == "text_completion" for c in plain)


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "prompt": "long", "max_tokens": 3000, "stream": True, "ignore_eos": True,
            "diffusion": {"steps": 48}}  # fmt: skip
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the first block arrived; hang up
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = http.get("/metrics").text
            if "dgserve_num_requests_running 0.0" in metrics and "dgserve_kv_cache_used_bytes 0.0" in metrics:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the aborted request still holds its slot")
