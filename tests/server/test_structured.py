"""Structured output and tool calls against a live server on random weights: valid by construction, or a 400."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.text import Tokenizer

FAST = {"diffusion": {"steps": 4}}

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum_array": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "sizes": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["colour", "sizes"],
    },
    "any_of_bounds": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "number", "minimum": -1.5, "maximum": 2.5}, {"type": "null"}]},
            "flag": {"type": "boolean"},
        },
        "required": ["value", "flag"],
    },
    "top_level_array": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 4},
}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_replies_validate(client: openai.OpenAI, name: str, seed: int) -> None:
    schema = SCHEMAS[name]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=160, seed=seed,
        response_format=_schema_format(schema), extra_body=FAST,
    )  # fmt: skip
    choice = reply.choices[0]
    jsonschema.validate(json.loads(choice.message.content), schema)
    assert choice.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_response_format_too(client: openai.OpenAI, stream: bool) -> None:
    schema = SCHEMAS["nested"]
    reply = client.completions.create(
        model="tiny", prompt="A JSON record:", max_tokens=120, seed=2, stream=stream,
        extra_body={**FAST, "response_format": _schema_format(schema)},
    )  # fmt: skip
    chunks = list(reply) if stream else [reply]
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks if c.choices)), schema)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", extra_body={"response_format": {"type": "yaml"}})
    assert refused.value.body["param"].startswith("response_format")


def test_json_object_and_a_short_budget_still_close(client: openai.OpenAI) -> None:
    for max_tokens in (200, 12):  # 12: the closing reserve takes over at once
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=max_tokens, seed=3,
            response_format={"type": "json_object"}, extra_body=FAST,
        )  # fmt: skip
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens <= max_tokens


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)


def test_openai_parse_returns_the_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "A pet"}], response_format=Pet, max_tokens=120, seed=5,
        extra_body=FAST,
    )  # fmt: skip
    assert isinstance(reply.choices[0].message.parsed, Pet)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name", "maxLength": 16},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Now",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
        },
    },
}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.id and call.type == "function" and call.function.name in TOOLS
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("seed", [0, 7])
def test_forced_tool_calls_are_valid_streamed_or_not(client: openai.OpenAI, tool_choice, seed: int) -> None:
    request = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Lisbon?"}], tools=[WEATHER, TIME],
                   tool_choice=tool_choice, max_tokens=128, seed=seed, extra_body=FAST)  # fmt: skip
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]

    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Lisbon?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Lisbon", "days": 2})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_a_tool_result_turn_is_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=CONVERSATION, tools=[WEATHER], max_tokens=40,
                                           seed=1, extra_body=FAST)  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_render_as_gemma_4_does(tiny_checkpoint) -> None:
    """The expected text is Gemma 4's format written out by hand (declarations in the system turn, keys sorted,
    strings between <|"|>, the result in the same model turn and no new generation prompt after it)."""
    q = '<|"|>'
    expected = (
        f"<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{{description:{q}Get the weather{q},"
        f"parameters:{{properties:{{city:{{description:{q}City name{q},type:{q}STRING{q}}},"
        f"days:{{type:{q}INTEGER{q}}},tags:{{items:{{type:{q}STRING{q}}},type:{q}ARRAY{q}}},"
        f"unit:{{enum:[{q}c{q},{q}f{q}],type:{q}STRING{q}}}}},required:[{q}city{q},{q}days{q}],"
        f"type:{q}OBJECT{q}}}}}<tool|><turn|>\n<|turn>user\nWeather in Lisbon?<turn|>\n<|turn>model\n"
        f"<|tool_call>call:get_weather{{city:{q}Lisbon{q},days:2}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{q}sunny, 21 C{q}}}<tool_response|>"
    )
    tokenizer = Tokenizer(tiny_checkpoint)
    messages = [
        {
            **m,
            "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ],
        }
        if m.get("tool_calls")
        else m
        for m in CONVERSATION
    ]
    ids = tokenizer.chat_prompt_ids(messages, enable_thinking=False, tools=[WEATHER])
    assert ids == tokenizer.encode(expected)
    assert ids.count(48) == ids.count(49) == 1 and ids.count(52) == 28  # the markers are single special tokens


def _bad(param: str, **body) -> tuple[str, dict]:
    return param, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}


BAD = [
    _bad("response_format.json_schema.schema", response_format=_schema_format({"type": "strin"})),
    _bad(
        "response_format.json_schema.schema", response_format=_schema_format({"type": "object", "dependentSchemas": {}})
    ),
    _bad("response_format.json_schema.schema", response_format=_schema_format({"$ref": "#/$defs/nowhere"})),
    _bad(
        "response_format.json_schema.schema.properties.a.pattern",
        response_format=_schema_format(
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a+)+$"}}}
        ),
    ),
    _bad(
        "response_format.json_schema.schema.pattern",
        response_format=_schema_format({"type": "string", "pattern": "((ab){200}){100}"}),
    ),
    _bad("response_format.type", response_format={"type": "yaml"}),
    _bad("tools[0]", tools=[{"type": "function"}]),
    _bad("tools[0].function.name", tools=[{"type": "function", "function": {"name": "bad name!"}}]),
    _bad(
        "tools[0].function.parameters.properties.x.pattern",
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(x*)*"}}},
                },
            }
        ],
        tool_choice="required",
    ),
    _bad(
        "tools[0].function.parameters",
        tools=[
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 12}}}},
            }
        ],
    ),
    _bad("tool_choice", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    _bad("tool_choice", tool_choice="required"),
]


@pytest.mark.parametrize(("param", "body"), BAD, ids=[f"{i}-{p}" for i, (p, _) in enumerate(BAD)])
def test_bad_grammars_are_400_and_the_server_keeps_serving(server, client, param: str, body: dict) -> None:
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and isinstance(error["code"], str)
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        extra_body=FAST)  # fmt: skip
    assert ok.choices[0].finish_reason in ("stop", "length")
