"""The diffusion options are named once (engine.request.DIFFUSION_OPTIONS) and keep that name over HTTP
(`diffusion.<name>`) and on the command line (`dgserve generate --<name>`); the engine is their one validator, and its
errors reach clients as 400s naming the API's parameter."""

from __future__ import annotations

import typing

import anthropic
import pytest

from engine.request import DIFFUSION_OPTIONS, SamplingParams
from server.chat import ChatApi
from server.cli import _sampling_params, build_parser
from server.completions import CompletionsApi
from server.messages import MessagesApi
from server.protocol import ChatCompletionRequest, DiffusionOptions
from server.responses import ResponsesApi
from server.serving import ApiFields
from tests.server.test_cli import dgserve
from tests.server.test_errors_and_endpoints import assert_openai_error

TYPES = typing.get_type_hints(SamplingParams)
NUMERIC = [name for name in DIFFUSION_OPTIONS if TYPES[name] is not bool]
SWITCHES = [name for name in DIFFUSION_OPTIONS if TYPES[name] is bool]


def test_every_option_is_a_typed_http_field_with_a_description():
    for name in DIFFUSION_OPTIONS:
        assert name in DiffusionOptions.model_fields and DiffusionOptions.model_fields[name].description, name


@pytest.mark.parametrize("name", NUMERIC)
def test_an_out_of_range_option_reaches_the_engine_by_name_and_comes_back_as_a_400_naming_it(server, name):
    # -1 is outside every numeric option's range; only the engine checks ranges, so its message proves the value
    # arrived as SamplingParams.<name>.
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                      "diffusion": {name: -1}})  # fmt: skip
    error = assert_openai_error(response, 400, "invalid_request", f"diffusion.{name}")
    assert error["message"].startswith(f"{name} must be ") and error["message"].endswith(("got -1", "got -1.0"))


def test_stream_drafts_reaches_the_engine(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True,
            "diffusion": {"steps": 2, "stream_drafts": True}}  # fmt: skip
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert [line for line in response.iter_lines() if line.startswith("event:")] == ["event: draft"] * 2


def test_every_option_is_a_generate_flag_that_fills_its_sampling_param():
    def params(*flags: str) -> SamplingParams:
        return _sampling_params(build_parser().parse_args(["generate", "--prompt", "x", *flags]))

    for name in NUMERIC:
        assert getattr(params(f"--{name.replace('_', '-')}", "7"), name) == 7, name
    for name in SWITCHES:
        assert getattr(params(f"--{name.replace('_', '-')}"), name) is True, name
    assert params() == SamplingParams()  # unset flags leave the defaults
    assert params("--drafts").stream_drafts  # the older name still works


def test_generate_reports_the_engines_error_for_a_bad_option(tiny_checkpoint):
    run = dgserve("generate", "--model", str(tiny_checkpoint), "--prompt-ids", "2,105", "--settle-entropy", "-1")
    assert run.returncode != 0 and "settle_entropy must be > 0 and <= 1e4, got -1.0" in run.stderr


EXPECTED = ("This model's maximum context length is 4096 tokens. However, you requested 200 output tokens and your "
            "prompt contains 4000 tokens.")  # fmt: skip


def test_context_length_is_one_openai_error_naming_each_apis_prompt_field(server):
    long = "x " * 3000  # over 4096 tokens in the tiny tokenizer
    with server.http() as http:
        # Two prompts x n=2, the first too long: one error, the engine's, for the whole request.
        body = {"model": "tiny", "prompt": [[5] * 4000, [5] * 10], "n": 2, "max_tokens": 200}
        error = assert_openai_error(http.post("/v1/completions", json=body), 400, "context_length_exceeded", "prompt")
        assert error["message"] == EXPECTED
        chat = {"model": "tiny", "messages": [{"role": "user", "content": long}], "max_completion_tokens": 8}
        error = assert_openai_error(http.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded",
                                    "messages")  # fmt: skip
        assert error["message"].startswith("This model's maximum context length is 4096 tokens.")
        responses = {"model": "tiny", "input": long, "max_output_tokens": 8}
        assert_openai_error(http.post("/v1/responses", json=responses), 400, "context_length_exceeded", "input")


def test_context_length_keeps_anthropics_error_shape(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="EMPTY", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": "x " * 3000}])
    error = err.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages: This model's maximum context length is 4096 tokens.")


def test_each_api_names_the_engines_fields_by_its_own_parameters():
    def chat(**fields) -> ApiFields:
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], **fields)
        return ChatApi(body, "tiny", pieces=None).fields

    cases = [(CompletionsApi.fields, "prompt", "prompt"), (CompletionsApi.fields, "logprobs", "logprobs"),
             (chat(max_tokens=4), "max_tokens", "max_tokens"), (chat(), "prompt", "messages"),
             (chat(max_completion_tokens=4), "max_tokens", "max_completion_tokens"),
             (chat(), "logprobs", "top_logprobs"), (ResponsesApi.fields, "prompt", "input"),
             (ResponsesApi.fields, "max_tokens", "max_output_tokens"), (MessagesApi.fields, "prompt", "messages"),
             (MessagesApi.fields, "canvas_init", "diffusion.canvas"),
             (MessagesApi.fields, "pinned", "diffusion.pinned"),
             *[(CompletionsApi.fields, name, f"diffusion.{name}") for name in DIFFUSION_OPTIONS]]  # fmt: skip
    for fields, field, param in cases:
        assert fields.param(field) == param, (fields, field)
