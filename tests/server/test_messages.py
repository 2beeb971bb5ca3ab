"""/v1/messages and /v1/messages/count_tokens through the official Anthropic client (and raw SSE) against a live
server."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

FAST = {"diffusion": {"steps": 2}}
TIME = {
    "name": "get_time",
    "description": "Now",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 8}},
        "required": ["zone"],
    },
}
WEATHER = {
    "name": "get_weather",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    },
}
SCHEMAS = {t["name"]: t["input_schema"] for t in (TIME, WEATHER)}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="EMPTY", max_retries=0)


def test_a_message_and_count_tokens_agree(claude):
    request = dict(model="tiny", max_tokens=24, system="Be brief.", messages=HI, extra_body={"seed": 3, **FAST})
    reply = claude.messages.create(**request)
    assert reply.type == "message" and reply.id.startswith("msg_") and reply.role == "assistant"
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.content[0].type == "text"
    assert 0 < reply.usage.output_tokens <= 24
    count = claude.messages.count_tokens(model="tiny", system="Be brief.", messages=HI)
    # Anthropic's input_tokens leave out what the prefix cache read (an earlier test may have sent this prompt).
    assert count.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert claude.messages.create(**request).content == reply.content  # the same seed, the same text


def test_streamed_events_follow_anthropics_grammar_and_the_sdk_assembles_them(claude, server):
    body = {"model": "tiny", "max_tokens": 24, "messages": HI, "stream": True, "seed": 3, **FAST}
    events = server.sse_events("/v1/messages", body)
    assert all(name == data["type"] for name, data in events)
    kinds = [name for name, _ in events]
    deltas = kinds.count("content_block_delta")
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * deltas, "content_block_stop",
                     "message_delta", "message_stop"]  # fmt: skip
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    with claude.messages.stream(model="tiny", max_tokens=24, messages=HI, extra_body={"seed": 3, **FAST}) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason == events[-2][1]["delta"]["stop_reason"]
    assert final.usage.output_tokens == events[-2][1]["usage"]["output_tokens"]


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}])
def test_tool_use_validates_and_streams_as_input_json_deltas(claude, server, tool_choice):
    request = dict(model="tiny", max_tokens=96, messages=HI, tools=[TIME, WEATHER], tool_choice=tool_choice)
    reply = claude.messages.create(**request, extra_body={"seed": 1, **FAST})
    calls = [block for block in reply.content if block.type == "tool_use"]
    assert calls and reply.stop_reason == "tool_use" and all(c.id.startswith("toolu_") for c in calls)
    for call in calls:
        jsonschema.validate(call.input, SCHEMAS[call.name])
    if tool_choice["type"] == "tool":
        assert [call.name for call in calls] == ["get_time"]
    events = server.sse_events("/v1/messages", {**request, "stream": True, "seed": 1, **FAST})
    streamed = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert json.loads(streamed if len(calls) == 1 else json.dumps(calls[0].input)) == calls[0].input


def test_a_tool_result_turn_is_accepted(claude):
    messages = [
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "noon"}]},
    ]
    reply = claude.messages.create(model="tiny", max_tokens=8, messages=messages, tools=[TIME], extra_body=FAST)
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_stop_sequences_are_reported(claude):
    request = dict(model="tiny", max_tokens=32, messages=HI, extra_body={"seed": 4, **FAST})
    text = claude.messages.create(**request).content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    reply = claude.messages.create(**request, stop_sequences=[stop])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert text.startswith(reply.content[0].text) and stop not in reply.content[0].text


def test_thinking_maps_onto_the_thought_channel(claude, server):
    request = dict(model="tiny", max_tokens=8, messages=HI, extra_body=FAST)
    on = claude.messages.count_tokens(model="tiny", messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
    off = claude.messages.count_tokens(model="tiny", messages=HI)
    assert on.input_tokens != off.input_tokens  # the template renders the thinking switch
    reply = claude.messages.create(**request, thinking={"type": "enabled", "budget_tokens": 1024})
    assert {block.type for block in reply.content} <= {"thinking", "text"}


BAD = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": None}),
    ("messages", {"messages": []}),
    ("messages.0.content.0.type", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
    ("messages.0.role", {"messages": [{"role": "system", "content": "x"}]}),
    ("tools", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    ("tools.0.input_schema", {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": 1}}}]}),
    (
        "tools.0.input_schema",
        {
            "tools": [
                {
                    "name": "f",
                    "input_schema": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(x*)*"}}},
                }
            ],
            "tool_choice": {"type": "any"},
        },
    ),  # a schema bomb
    ("tool_choice", {"tools": [TIME], "tool_choice": {"type": "tool", "name": "nope"}}),
    ("tool_choice", {"tool_choice": {"type": "any"}}),
    ("top_k", {"top_k": 5}),
    ("thinking", {"thinking": {"type": "sometimes"}}),
    ("temperature", {"temperature": 1.5}),
    ("temperature", {"temperature": "0.5"}),
    ("messages", {"max_tokens": 2**63}),  # does not fit the context: context_length_exceeded names the prompt
    ("stop_sequences", {"stop_sequences": ["x"] * 10_000}),
    ("messages.0.content", {"messages": [{"role": "user", "content": "\ud800"}]}),
]


@pytest.mark.parametrize(("param", "change"), BAD, ids=[f"{i}-{p}" for i, (p, _) in enumerate(BAD)])
def test_bad_input_is_an_anthropic_400_naming_the_parameter(server, param, change):
    body = {"model": "tiny", "max_tokens": 4, "messages": HI, **change}
    with server.http() as http:
        data = json.dumps({k: v for k, v in body.items() if v is not None})  # ASCII: lone surrogates as escapes
        response = http.post("/v1/messages", content=data, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(param) or param in error["error"]["message"]
