"""schemathesis against our own /openapi.json, over HTTP to a real `dgserve serve` process on loopback.

Positive mode: schema-valid requests (kept cheap by `_cheap`) never get a 5xx, and 2xx bodies match the schemas the
server declares. Negative mode: schema-invalid requests never get a 5xx and are refused with a 4xx.

Bounded and deterministic: derandomized Hypothesis without an example database, MAX_EXAMPLES per operation and mode,
a timeout on every request.

Why Hypothesis strategies (`operation.as_strategy`) rather than `schemathesis.pytest.from_fixture(...).parametrize()`:
the server is a fixture, so the lazy loader is the only pytest integration that fits, and in schemathesis 4.32.5 it
reads `request.node._nodeid`, which pytest 9.2 no longer has (AttributeError before any request is sent).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from tests.server.conftest import LiveServer

MAX_EXAMPLES = 25
REQUEST_TIMEOUT = 30  # seconds; every request here takes well under one
GENERATE = ("/v1/completions", "/v1/chat/completions")
POSTS = [*GENERATE, "/tokenize", "/detokenize"]
GETS = ["/v1/models", "/v1/models/{model_id}", "/health", "/ready", "/metrics", "/version", "/tokenizer_info"]
OPERATIONS = [("POST", path) for path in POSTS] + [("GET", path) for path in GETS]
# Negative data needs a body to break (a string path parameter cannot be made invalid).
NEGATIVE_OPERATIONS = [("POST", path) for path in POSTS]


@pytest.fixture(scope="module")
def api_schema(server: LiveServer):
    """Fuzz the shared test server (tests/conftest.py): no API key, the tiny checkpoint."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.update(request_timeout=REQUEST_TIMEOUT)
    return schema


# Refused by design with a 400 naming them, or grammars that random values make invalid (tests/server covers both):
# dropped, so that most positive cases generate.
UNSUPPORTED = ("top_p", "frequency_penalty", "presence_penalty", "logit_bias", "echo", "logprobs", "best_of",
               "top_logprobs", "tools", "tool_choice", "response_format", "audio", "modalities")  # fmt: skip


def _at_most(value, cap: int) -> int:
    return min(value, cap) if isinstance(value, int) and not isinstance(value, bool) else cap


def _cheap(case) -> None:
    """Make a schema-valid generation request cheap and likely to generate: our model, a few tokens, choices and
    denoising steps. The fuzzer's own values (max_tokens up to 2**63, 256 prompts x n=16, chat without max_tokens =
    the whole context) are valid but slow; test_bad_input.py covers their validation."""
    body = case.body
    if case.path not in GENERATE or not isinstance(body, dict):
        return
    for key in UNSUPPORTED:
        body.pop(key, None)
    body["model"] = "tiny"
    body["max_tokens"] = _at_most(body.get("max_tokens"), 8)
    body["n"] = _at_most(body.get("n", 1), 2)
    if case.path == "/v1/chat/completions":
        body["max_completion_tokens"] = _at_most(body.get("max_completion_tokens"), 8)
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("role") in ("tool", "function"):  # need tool_calls before
                message["role"] = "user"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        body["prompt"] = prompt[:2]
    if isinstance(body.get("diffusion"), dict) and "steps" in body["diffusion"]:
        body["diffusion"]["steps"] = _at_most(body["diffusion"]["steps"], 4)


def _run(operation, mode: GenerationMode, checks: list, prepare) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,  # the request timeout bounds each example
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        prepare(case)
        case.call_and_validate(checks=checks, timeout=REQUEST_TIMEOUT)

    run()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_positive_no_server_errors_and_conforming_responses(api_schema, method, path):
    _run(api_schema[path][method], GenerationMode.POSITIVE, [not_a_server_error, response_schema_conformance], _cheap)


def _bounded(case) -> None:
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict):
        case.body.setdefault("max_tokens", 8)  # accepted by mistake, it would generate up to the whole context


@pytest.mark.parametrize(("method", "path"), NEGATIVE_OPERATIONS, ids=[f"{m} {p}" for m, p in NEGATIVE_OPERATIONS])
def test_negative_no_server_errors_and_rejected(api_schema, method, path):
    _run(api_schema[path][method], GenerationMode.NEGATIVE, [not_a_server_error, negative_data_rejection], _bounded)
