"""/v1/responses through the official OpenAI client (and raw SSE) against a live server, and the openai-agents SDK
running a one-tool agent over both Responses and chat completions."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

FAST = {"diffusion": {"steps": 2}}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "Now",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]},
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    },
}
SCHEMAS = {t["name"]: t["parameters"] for t in (TIME, WEATHER)}


def test_a_response_and_the_same_seed_gives_the_same_text(client, server):
    request = dict(model="tiny", input="Hi", instructions="Be brief.", max_output_tokens=24,
                   extra_body={"seed": 3, **FAST})  # fmt: skip
    first, second = client.responses.create(**request), client.responses.create(**request)
    assert first.object == "response" and first.id.startswith("resp_") and first.id != second.id
    assert first.status in ("completed", "incomplete") and first.output[0].type == "message"
    assert first.output_text == second.output_text
    assert (first.status == "incomplete") == (first.incomplete_details is not None)
    with server.http() as http:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert first.usage.input_tokens == http.post("/tokenize", json={"messages": messages}).json()["count"]
    usage = first.usage
    assert 0 < usage.output_tokens <= 24 and usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_streamed_events_follow_openais_grammar_and_the_sdk_assembles_them(client, server):
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 24, "stream": True, "seed": 3, **FAST}
    events = server.sse_events("/v1/responses", body)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    kinds = [name for name, _ in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     kinds[-1]]  # fmt: skip
    final = events[-1][1]["response"]
    assert kinds[-1] == f"response.{final['status']}" and final["status"] in ("completed", "incomplete")
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text
    with client.responses.stream(model="tiny", input="Hi", max_output_tokens=24, extra_body={"seed": 3, **FAST}) as s:
        *_, last = s  # get_final_response() wants response.completed; the tiny model often runs to the limit
    assert last.type == kinds[-1] and last.response.output_text == text


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


def test_parse_returns_the_pydantic_model(client):
    reply = client.responses.parse(model="tiny", input="A pet", text_format=Pet, max_output_tokens=120,
                                   extra_body={"seed": 5, **FAST})  # fmt: skip
    assert isinstance(reply.output_parsed, Pet)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_forced_function_calls_validate_streamed_or_not(client, server, tool_choice):
    request = dict(model="tiny", input="Time?", tools=[TIME, WEATHER], tool_choice=tool_choice, max_output_tokens=96,
                   extra_body={"seed": 1, **FAST})  # fmt: skip
    reply = client.responses.create(**request)
    calls = [item for item in reply.output if item.type == "function_call"]
    assert calls and reply.status == "completed"
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    if isinstance(tool_choice, dict):
        assert [call.name for call in calls] == ["get_time"]
    body = {"model": "tiny", "input": "Time?", "tools": [TIME, WEATHER], "tool_choice": tool_choice,
            "max_output_tokens": 96, "stream": True, "seed": 1, **FAST}  # fmt: skip
    events = server.sse_events("/v1/responses", body)
    done = [data for name, data in events if name == "response.function_call_arguments.done"]
    assert [d["arguments"] for d in done] == [call.arguments for call in calls]


def test_a_function_call_output_turn_and_previous_response_id(client):
    first = client.responses.create(model="tiny", input="Time?", tools=[TIME], tool_choice="required",
                                    max_output_tokens=64, extra_body={"seed": 2, **FAST})  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    answer = [{"type": "function_call_output", "call_id": call.call_id, "output": "noon"}]
    chained = client.responses.create(model="tiny", previous_response_id=first.id, input=answer, tools=[TIME],
                                      max_output_tokens=8, extra_body=FAST)  # fmt: skip
    explicit = client.responses.create(
        model="tiny", tools=[TIME], max_output_tokens=8, extra_body=FAST,
        input=[{"role": "user", "content": "Time?"}, {"type": "function_call", "call_id": call.call_id,
               "name": call.name, "arguments": call.arguments}, *answer],
    )  # fmt: skip
    assert chained.usage.input_tokens == explicit.usage.input_tokens  # the stored turn renders as the explicit one
    assert chained.previous_response_id == first.id
    assert client.responses.retrieve(chained.id).output_text == chained.output_text
    client.responses.delete(chained.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(chained.id)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="tiny", previous_response_id=chained.id, input="more", max_output_tokens=4)
    assert error.value.body["param"] == "previous_response_id"


def test_store_false_is_not_retrievable_and_metrics_name_the_routes(client, server):
    reply = client.responses.create(model="tiny", input="Hi", store=False, max_output_tokens=4, extra_body=FAST)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert 'endpoint="/v1/responses",status="200"' in metrics
    assert 'endpoint="/v1/responses/{id}",status="404"' in metrics


BOMB = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(x*)*"}}}
BAD = [
    ("background", {"background": True}),
    ("tools", {"tools": [{"type": "web_search"}]}),
    ("tool_choice", {"tools": [TIME], "tool_choice": {"type": "function", "name": "nope"}}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tools[0].function.parameters", {"tools": [TIME | {"parameters": {"type": "object", "properties": {"x": 1}}}]}),
    (
        "text.format.schema.properties.x.pattern",
        {"text": {"format": {"type": "json_schema", "name": "b", "schema": BOMB}}},
    ),
    ("max_output_tokens", {"max_output_tokens": 0}),
    ("input", {"input": []}),
    ("input", {"input": 7}),
    ("input[0].type", {"input": [{"type": "computer_call_output"}]}),
    ("input[0].content[0]", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
    ("input[0].call_id", {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}),
    ("include", {"include": ["reasoning.encrypted_content"]}),
    ("previous_response_id", {"previous_response_id": "resp_nope"}),
    ("input", {"max_output_tokens": 2**63}),  # does not fit the context: context_length_exceeded names the prompt
    ("temperature", {"temperature": "0.5"}),
    ("input", {"input": "\ud800"}),
]


@pytest.mark.parametrize(("param", "change"), BAD, ids=[f"{i}-{p}" for i, (p, _) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_parameter(server, param, change):
    with server.http() as http:
        data = json.dumps({"model": "tiny", "input": "hi", **change})  # ASCII: lone surrogates as escapes
        response = http.post("/v1/responses", content=data, headers={"content-type": "application/json"})
    assert response.status_code == (404 if param == "previous_response_id" else 400), response.text
    assert response.json()["error"]["param"] == param


def test_an_agent_runs_its_tool_over_responses_and_over_chat_completions(server):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no network
    zones: list[str] = []

    @function_tool
    def get_time(zone: str) -> str:
        """The time in a zone."""
        zones.append(zone)
        return "noon"

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
        settings = ModelSettings(tool_choice="get_time", max_tokens=48, extra_body={"seed": 1, **FAST})
        outputs = []
        for model in (OpenAIResponsesModel("tiny", client), OpenAIChatCompletionsModel("tiny", client)):
            # Forced, so random weights still call it; the run ends with the tool's result.
            agent = Agent(name="clock", instructions="Use tools.", tools=[get_time], model=model,
                          model_settings=settings, tool_use_behavior="stop_on_first_tool")  # fmt: skip
            outputs.append((await Runner.run(agent, "What time is it in Lisbon?", max_turns=2)).final_output)
        return outputs

    assert asyncio.run(run()) == ["noon", "noon"]
    assert len(zones) == 2 and all(
        isinstance(zone, str) for zone in zones
    )  # the SDK checked them against the signature
