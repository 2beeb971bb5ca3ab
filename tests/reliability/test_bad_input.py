"""Bad input against a real `dgserve serve` process on loopback: the CVE-derived cases of openai-api.md §4.3 and
issue 7's list. Each gets a fast 4xx with the OpenAI error object, never a 5xx and never a hang, and the server keeps
serving after every case (`still_serving`). Where the HTTP layer (uvicorn/h11) refuses a request before the app sees
it, no OpenAI body is possible: there a 4xx or a closed connection is the pass. Inputs that are valid after all get a
correct 200, with the reason next to them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server, stop_server
from tests.server.test_errors_and_endpoints import assert_openai_error

FAST = 3.0  # seconds: every refusal below takes milliseconds; this only catches hangs and event-loop stalls
TIMEOUT = 30.0  # no request waits longer
C, CH, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
USER = {"role": "user", "content": "hi"}
JSON = {"content-type": "application/json"}


def comp(**fields) -> dict:
    return {"model": "tiny", "prompt": "hello", **fields}


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [USER], **fields}


def body_bytes(body) -> bytes:
    """json.dumps escapes lone surrogates ("\\ud800") and writes NaN/Infinity literals, as a hostile client would;
    bytes are sent as they are."""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture(scope="module")
def bad_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_checkpoint, tmp_path_factory.mktemp("bad_input") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture
def http(bad_server: LiveServer) -> Iterator[httpx.Client]:
    """A fresh client per case: a connection the server closed must not fail the next case."""
    with httpx.Client(base_url=bad_server.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(bad_server: LiveServer) -> Iterator[None]:
    """After every case: the process is alive, /health is 200 and a normal request succeeds."""
    yield
    assert bad_server.process.poll() is None, bad_server.logs()[-3000:]
    with httpx.Client(base_url=bad_server.url, timeout=TIMEOUT) as client:
        assert client.get("/health").status_code == 200
        assert_completion(client.post(C, json=comp(max_tokens=4)))


def post(http: httpx.Client, path: str, body, **kwargs) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = http.post(path, content=body_bytes(body), headers=kwargs.pop("headers", JSON), **kwargs)
    return response, time.monotonic() - start


def assert_completion(response: httpx.Response, kind: str = "text_completion", choices: int = 1) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == kind and len(body["choices"]) == choices
    assert [c["index"] for c in body["choices"]] == list(range(choices))
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    return body


def case(path: str, body, code: str, param: str | None = None, *, status: int = 400, id: str):
    return pytest.param(path, body, status, code, param, id=id)


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


BIG = 10**400  # parses to a Python int; json.dumps writes it out in full
# fmt: off
REFUSED = [
    # n: CVE-2026-34756 (unbounded n fans out and blocks the loop)
    case(C, comp(n=1_000_000), "invalid_request", "n", id="n-1e6"),
    case(C, comp(n=2**63), "invalid_request", "n", id="n-2**63"),
    case(C, comp(n=BIG), "invalid_request", "n", id="n-1e400"),
    case(C, comp(n=-1), "invalid_request", "n", id="n-negative"),
    case(C, comp(n=0), "invalid_request", "n", id="n-zero"),
    case(CH, chat(n=1_000_000), "invalid_request", "n", id="chat-n-1e6"),
    # n x prompts: each within its own cap, the product is not (256 choices at most)
    case(C, comp(prompt=["x"] * 17, n=16), "invalid_request", "n", id="n16-x-17-prompts"),
    case(C, comp(prompt=["x"] * 256, n=16), "invalid_request", "n", id="n16-x-256-prompts"),
    case(C, comp(prompt=[[5]] * 100, n=10), "invalid_request", "n", id="n10-x-100-token-prompts"),
    case(C, comp(prompt=["x"] * 257), "invalid_request", "prompt", id="257-prompts"),
    # max_tokens: huge ones cannot fit the context; negative and zero are invalid
    case(C, comp(max_tokens=10**9), "context_length_exceeded", "prompt", id="max_tokens-1e9"),
    case(C, comp(max_tokens=2**64), "context_length_exceeded", "prompt", id="max_tokens-2**64"),
    case(C, comp(max_tokens=BIG), "context_length_exceeded", "prompt", id="max_tokens-1e400"),
    case(C, comp(max_tokens=-1), "invalid_request", "max_tokens", id="max_tokens-negative"),
    case(C, comp(max_tokens=0), "invalid_request", "max_tokens", id="max_tokens-zero"),
    case(CH, chat(max_tokens=10**9), "context_length_exceeded", "messages", id="chat-max_tokens-1e9"),
    case(CH, chat(max_completion_tokens=2**63), "context_length_exceeded", "messages", id="chat-max_completion-2**63"),
    case(CH, chat(max_tokens=-5), "invalid_request", "max_tokens", id="chat-max_tokens-negative"),
    # token ids: negative, or outside the 2048-token vocabulary
    case(C, comp(prompt=[-1]), "invalid_request", "prompt", id="token-negative"),
    case(C, comp(prompt=[[1], [-5]]), "invalid_request", "prompt", id="token-negative-nested"),
    case(C, comp(prompt=[2048]), "invalid_prompt", "prompt", id="token-vocab-size"),
    case(C, comp(prompt=[10**9]), "invalid_prompt", "prompt", id="token-1e9"),
    case(C, comp(prompt=[2**64]), "invalid_prompt", "prompt", id="token-2**64"),
    case(C, comp(prompt=[[1], [2**70]]), "invalid_prompt", "prompt", id="token-2**70-nested"),
    case(DETOK, {"tokens": [-1]}, "invalid_request", "tokens", id="detokenize-negative"),
    case(DETOK, {"tokens": [2**64]}, "invalid_request", "tokens", id="detokenize-2**64"),
    # empty prompts: CVE-2024-8768 (an empty prompt crashed vLLM)
    case(C, comp(prompt=""), "invalid_request", "prompt", id="prompt-empty-string"),
    case(C, comp(prompt=[]), "invalid_request", "prompt", id="prompt-empty-list"),
    case(C, comp(prompt=[[]]), "invalid_request", "prompt", id="prompt-empty-token-list"),
    case(C, comp(prompt=[[1], []]), "invalid_request", "prompt", id="prompt-one-empty-token-list"),
    case(C, comp(prompt=[""]), "invalid_request", "prompt", id="prompt-list-of-empty-string"),
    case(C, comp(prompt=None), "invalid_request", "prompt", id="prompt-null"),
    case(C, {"model": "tiny"}, "invalid_request", "prompt", id="prompt-missing"),
    case(CH, chat(messages=[]), "invalid_request", "messages", id="messages-empty"),
    case(CH, chat(messages=[{"role": "user", "content": []}]), "invalid_request", "messages.0.content",
         id="message-content-empty-parts"),  # the spec's minItems 1
    case(TOK, {"messages": []}, "invalid_request", "messages", id="tokenize-messages-empty"),
    case(TOK, {}, "invalid_request", "prompt", id="tokenize-nothing"),
    # stop: 10,000 strings, 1 MB strings
    case(C, comp(stop=["s"] * 10_000), "invalid_request", "stop", id="stop-10k-strings"),
    case(C, comp(stop="s" * 2**20), "invalid_request", "stop", id="stop-1MB-string"),
    case(C, comp(stop=["s" * 2**20]), "invalid_request", "stop", id="stop-list-1MB-string"),
    case(CH, chat(stop=["s"] * 10_000), "invalid_request", "stop", id="chat-stop-10k-strings"),
    # deeply nested JSON: the parser's recursion limit is a 400, not a crash
    case(C, b"[" * 100_000, "invalid_request", id="nested-100k-open-brackets"),
    case(C, nested(100_000), "invalid_request", id="nested-100k-balanced"),
    case(C, b'{"model": "tiny", "prompt": ' + nested(100_000, b"5") + b"}", "invalid_request", id="nested-in-prompt"),
    case(CH, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "invalid_request", id="nested-100k-objects"),
    # NaN / Infinity literals (not JSON, but Python's parser takes them)
    case(C, comp(temperature=float("nan")), "invalid_request", "temperature", id="temperature-NaN"),
    case(C, comp(temperature=float("inf")), "invalid_request", "temperature", id="temperature-Infinity"),
    case(C, comp(temperature=float("-inf")), "invalid_request", "temperature", id="temperature-minus-Infinity"),
    case(C, b'{"model": "tiny", "prompt": "x", "temperature": 1e400}', "invalid_request", "temperature",
         id="temperature-1e400"),
    case(C, comp(top_p=float("nan")), "invalid_request", "top_p", id="top_p-NaN"),
    case(C, comp(max_tokens=float("nan")), "invalid_request", "max_tokens", id="max_tokens-NaN"),
    case(C, comp(seed=float("inf")), "invalid_request", "seed", id="seed-Infinity"),
    case(C, comp(diffusion={"entropy_bound": float("nan")}), "invalid_request", "diffusion.entropy_bound",
         id="diffusion-NaN"),
    case(CH, chat(frequency_penalty=float("inf")), "invalid_request", "frequency_penalty", id="penalty-Infinity"),
    # non-object bodies
    *[case(path, body, "invalid_request", id=f"{name}-body-{path.strip('/').replace('/', '-')}")
      for path in (C, CH, TOK) for name, body in [("array", [1, 2]), ("string", "hello"), ("number", 42),
                                                  ("null", None), ("true", True)]],
    case(C, b"", "invalid_request", id="empty-body"),
    case(C, b"{nope", "invalid_request", id="malformed-json"),
    case(C, b'{"model": "tiny", "prompt": "a\xff\xfe"}', "invalid_request", id="invalid-utf8-bytes"),
    # stream_options without stream
    case(C, comp(stream_options={"include_usage": True}), "invalid_request", "stream_options", id="stream_options"),
    case(C, comp(stream=False, stream_options={}), "invalid_request", "stream_options", id="stream_options-false"),
    case(CH, chat(stream_options={"include_usage": True}), "invalid_request", "stream_options",
         id="chat-stream_options"),
    # lone surrogates ("\ud800" escaped in JSON): no tokenizer takes them and no response can encode them
    case(C, comp(prompt="a\ud800b"), "invalid_request", "prompt", id="surrogate-prompt"),
    case(C, comp(prompt=["ok", "\udfff"]), "invalid_request", "prompt.1", id="surrogate-prompt-list"),
    case(CH, chat(messages=[{"role": "user", "content": "a\ud800"}]), "invalid_request", "messages.0.content",
         id="surrogate-message"),
    case(CH, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]), "invalid_request",
         "messages.0.content.0.text", id="surrogate-content-part"),
    case(CH, chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]), "invalid_request",
         "messages.0.name", id="surrogate-message-name"),
    case(C, comp(model="\ud800"), "invalid_request", "model", id="surrogate-model"),  # echoed in a 404 otherwise
    case(C, comp(stop="\ud800"), "invalid_request", "stop", id="surrogate-stop"),
    case(C, comp(user="\ud800"), "invalid_request", "user", id="surrogate-user"),
    case(C, {**comp(), "\ud800": 1}, "invalid_request", id="surrogate-extra-key"),  # logged by name otherwise
    case(C, comp(diffusion={"\ud800": 1}), "invalid_request", "diffusion", id="surrogate-nested-key"),
    # seed: int64 only
    case(C, comp(seed=2**64), "invalid_request", "seed", id="seed-2**64"),
    case(C, comp(seed=-1), "invalid_request", "seed", id="seed-negative"),
    case(C, comp(seed=BIG), "invalid_request", "seed", id="seed-1e400"),
    case(C, b'{"model": "tiny", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "invalid_request",
         id="seed-5000-digits"),  # past Python's int parsing limit: a parse error
    # wrong types for every main field (numbers must be JSON numbers: no "5", no true)
    case(C, comp(model=5), "invalid_request", "model", id="type-model-int"),
    case(C, comp(model=["tiny"]), "invalid_request", "model", id="type-model-list"),
    case(C, comp(prompt=5), "invalid_request", "prompt", id="type-prompt-int"),
    case(C, comp(prompt={"text": "x"}), "invalid_request", "prompt", id="type-prompt-object"),
    case(C, comp(prompt=["a", 1]), "invalid_request", "prompt", id="type-prompt-mixed-list"),
    case(C, comp(prompt=[1.5]), "invalid_request", "prompt", id="type-prompt-float-ids"),
    case(C, comp(prompt=[True]), "invalid_request", "prompt", id="type-prompt-bool-ids"),
    case(C, comp(max_tokens="5"), "invalid_request", "max_tokens", id="type-max_tokens-string"),
    case(C, comp(max_tokens=True), "invalid_request", "max_tokens", id="type-max_tokens-bool"),
    case(C, comp(max_tokens=2.5), "invalid_request", "max_tokens", id="type-max_tokens-fraction"),
    case(C, comp(n="2"), "invalid_request", "n", id="type-n-string"),
    case(C, comp(n=True), "invalid_request", "n", id="type-n-bool"),
    case(C, comp(temperature="0.5"), "invalid_request", "temperature", id="type-temperature-string"),
    case(C, comp(temperature=True), "invalid_request", "temperature", id="type-temperature-bool"),
    case(C, comp(temperature=[1]), "invalid_request", "temperature", id="type-temperature-list"),
    case(C, comp(seed="1"), "invalid_request", "seed", id="type-seed-string"),
    case(C, comp(seed=1.5), "invalid_request", "seed", id="type-seed-fraction"),
    case(C, comp(stream="yes"), "invalid_request", "stream", id="type-stream-string"),
    case(C, comp(stream=1), "invalid_request", "stream", id="type-stream-int"),
    case(C, comp(stop=5), "invalid_request", "stop", id="type-stop-int"),
    case(C, comp(stop=[5]), "invalid_request", "stop", id="type-stop-list-int"),
    case(C, comp(stop={"a": 1}), "invalid_request", "stop", id="type-stop-object"),
    case(C, comp(stream=True, stream_options="x"), "invalid_request", "stream_options", id="type-stream_options"),
    case(C, comp(echo="yes"), "invalid_request", "echo", id="type-echo"),
    case(C, comp(user=5), "invalid_request", "user", id="type-user"),
    case(C, comp(logit_bias="x"), "invalid_request", "logit_bias", id="type-logit_bias"),
    case(C, comp(diffusion="x"), "invalid_request", "diffusion", id="type-diffusion"),
    case(C, comp(diffusion={"steps": "4"}), "invalid_request", "diffusion.steps", id="type-diffusion-steps"),
    case(CH, chat(messages="hi"), "invalid_request", "messages", id="type-messages-string"),
    case(CH, chat(messages={"role": "user"}), "invalid_request", "messages", id="type-messages-object"),
    case(CH, chat(messages=[[USER]]), "invalid_request", "messages.0", id="type-message-list"),
    case(CH, chat(messages=[{"content": "hi"}]), "invalid_request", "messages.0.role", id="message-no-role"),
    case(CH, chat(messages=[{"role": "wizard", "content": "hi"}]), "invalid_request", "messages.0.role",
         id="message-bad-role"),
    case(CH, chat(messages=[{"role": 5, "content": "hi"}]), "invalid_request", "messages.0.role",
         id="type-message-role"),
    case(CH, chat(messages=[{"role": "user", "content": 5}]), "invalid_request", "messages.0.content",
         id="type-message-content"),
    case(CH, chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]), "invalid_request",
         "messages.0.content", id="content-part-no-type"),
    case(CH, chat(max_completion_tokens="8"), "invalid_request", "max_completion_tokens",
         id="type-max_completion_tokens"),
    case(CH, chat(logprobs="yes"), "invalid_request", "logprobs", id="type-logprobs"),
    case(CH, chat(response_format="json"), "invalid_request", "response_format", id="type-response_format"),
    case(CH, chat(tool_choice=5), "invalid_request", "tool_choice", id="type-tool_choice"),
    case(CH, chat(chat_template_kwargs={"enable_thinking": "yes"}), "invalid_request",
         "chat_template_kwargs.enable_thinking", id="type-enable_thinking"),
    case(TOK, {"messages": [1]}, "invalid_request", "messages.0", id="type-tokenize-messages"),
    case(DETOK, {"tokens": "abc"}, "invalid_request", "tokens", id="type-detokenize-tokens"),
    # unknown model
    case(C, comp(model="gpt-4"), "model_not_found", "model", status=404, id="unknown-model"),
    case(CH, chat(model="gpt-4"), "model_not_found", "model", status=404, id="chat-unknown-model"),
    case(C, comp(model="ti\x00ny"), "model_not_found", "model", status=404, id="unknown-model-NUL"),
    # the rest of §4.3: best_of (CVE-2024-8939), logprobs, huge logit_bias and messages, tool and JSON schemas
    # (CVE-2025-48942/48943/48944), remote image URLs (SSRF), penalties at their extremes (CVE-2026-44223)
    case(C, comp(best_of=10**6), "unsupported_parameter", "best_of", id="best_of-1e6"),
    case(C, comp(logprobs=10**6), "invalid_request", "logprobs", id="logprobs-1e6"),
    case(C, comp(logprobs=-1), "invalid_request", "logprobs", id="logprobs-negative"),
    case(CH, chat(logprobs=True, top_logprobs=10**6), "invalid_request", "top_logprobs", id="top_logprobs-1e6"),
    case(C, comp(logit_bias={str(i): 1 for i in range(100_000)}), "unsupported_parameter", "logit_bias",
         id="logit_bias-100k-keys"),
    case(C, comp(logit_bias={"abc": "x"}), "invalid_request", "logit_bias.abc", id="logit_bias-non-numeric"),
    case(CH, chat(messages=[USER] * 100_000), "invalid_request", "messages", id="messages-100k"),
    case(CH, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(a+)+$"}}}}}]),
         "invalid_request", "tools[0].function.parameters.properties.a.pattern", id="tool-catastrophic-regex"),
    case(CH, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
         "invalid_request", "response_format.json_schema.schema", id="response_format-bad-schema"),
    case(CH, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:1/metadata"}}]}]), "unsupported_parameter", "messages[0].content",
         id="image-url-ssrf"),
    case(C, comp(frequency_penalty=2), "unsupported_parameter", "frequency_penalty", id="penalty-max"),
    case(C, comp(presence_penalty=1e308), "invalid_request", "presence_penalty", id="penalty-1e308"),
    case(C, comp(temperature=3), "invalid_request", "temperature", id="temperature-3"),
    case(C, comp(diffusion={"steps": 10**9}), "invalid_request", "diffusion.steps", id="diffusion-steps-1e9"),
    case(C, comp(diffusion={"steps": 0}), "invalid_request", "diffusion.steps", id="diffusion-steps-0"),
]
# fmt: on


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), REFUSED)
def test_refused_fast_with_an_openai_error(http, path, body, status, code, param):
    response, elapsed = post(http, path, body)
    assert_openai_error(response, status, code, param)
    assert elapsed < FAST, f"took {elapsed:.2f}s"


MULTIPART = "--x\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--x--\r\n"


@pytest.mark.parametrize(
    ("headers", "content"),
    [
        ({"content-type": "text/plain"}, json.dumps(comp(max_tokens=2))),
        ({"content-type": "application/x-www-form-urlencoded"}, "model=tiny&prompt=x"),
        ({"content-type": "multipart/form-data; boundary=x"}, MULTIPART),
        ({}, json.dumps(comp(max_tokens=2))),
    ],
    ids=["text-plain", "form", "multipart", "no-content-type"],
)
def test_wrong_content_type_is_400(http, headers, content):
    start = time.monotonic()
    response = http.post(C, content=content, headers=headers)
    assert_openai_error(response, 400, "invalid_request")
    assert time.monotonic() - start < FAST


# --- inputs that are valid after all: a correct 200 ---------------------------------------------------------------


# fmt: off
VALID = [
    # NUL is a character like any other (JSON "\u0000"): the tokenizer encodes it, nothing truncates at it.
    pytest.param(C, comp(prompt="a\x00b", max_tokens=2), "text_completion", 1, id="NUL-in-prompt"),
    pytest.param(CH, chat(messages=[{"role": "user", "content": "a\x00b"}], max_tokens=2), "chat.completion", 1,
                 id="NUL-in-message"),
    # Whitespace is text: it encodes to tokens.
    pytest.param(C, comp(prompt=" ", max_tokens=2), "text_completion", 1, id="whitespace-prompt"),
    # An empty or null message content: the chat template still renders the turn markers, so the prompt is not
    # empty (the spec allows "" for user content; vLLM takes null as "" too).
    pytest.param(CH, chat(messages=[{"role": "user", "content": ""}], max_tokens=2), "chat.completion", 1,
                 id="empty-message-content"),
    pytest.param(CH, chat(messages=[{"role": "user", "content": None}], max_tokens=2), "chat.completion", 1,
                 id="null-message-content"),
    # An empty stop string can never match: it means no stop string.
    pytest.param(C, comp(stop="", max_tokens=2), "text_completion", 1, id="empty-stop"),
    # The largest seed: n samples use seed + i modulo 2**63, no overflow.
    pytest.param(C, comp(seed=2**63 - 1, n=2, max_tokens=2), "text_completion", 2, id="seed-int64-max"),
    # 8.0 is an integer to JSON Schema (and so to our declared schema).
    pytest.param(C, comp(max_tokens=8.0), "text_completion", 1, id="integral-float-max_tokens"),
]
# fmt: on


@pytest.mark.parametrize(("path", "body", "kind", "choices"), VALID)
def test_valid_after_all(http, path, body, kind, choices):
    response, _ = post(http, path, body)
    assert_completion(response, kind, choices)


def test_detokenize_nothing_is_empty_text(http):
    response, _ = post(http, DETOK, {"tokens": []})
    assert response.status_code == 200 and response.json() == {"prompt": ""}


def test_a_body_in_20k_one_byte_chunks_is_served(http):
    """Triton CVE-2025-23310/23311 came from many small chunks: a valid body sent one byte per chunk is served."""
    body = body_bytes(comp(max_tokens=2)).ljust(20_000)
    response = http.post(C, content=(body[i : i + 1] for i in range(len(body))), headers=JSON)
    assert_completion(response)


# --- sizes: bodies and headers ------------------------------------------------------------------------------------


def test_oversized_body_with_content_length_is_413(http):
    response, elapsed = post(http, C, comp(prompt="x" * (9 * 2**20)))
    assert_openai_error(response, 413, "content_too_large")
    assert elapsed < FAST


def chunked_oversized(http: httpx.Client) -> tuple[httpx.Response, float]:
    """9 MB with no Content-Length: the limit has to be counted while the body streams in."""
    start = time.monotonic()
    response = http.post(C, content=(b" " * 2**16 for _ in range(144)), headers=JSON)
    return response, time.monotonic() - start


def test_oversized_chunked_body_is_refused_fast(http):
    response, elapsed = chunked_oversized(http)
    assert 400 <= response.status_code < 500 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert elapsed < FAST


def test_oversized_chunked_body_is_413(http):
    assert_openai_error(chunked_oversized(http)[0], 413, "content_too_large")


def raw_request(server: LiveServer, request: bytes) -> tuple[bytes, float]:
    """Send bytes as they are (httpx refuses a malformed Content-Length); returns what came back before the server
    closed the connection or went quiet."""
    url = urlsplit(server.url)
    start = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused part-way: read what it said
            sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 12:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


def status_of(raw: bytes) -> int | None:
    """The status of a raw HTTP response, or None for a connection closed without one."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize(
    "content_length",
    [b"-1", b"abc", b"1.5", b"99999999999999999999999"],
    ids=["negative", "not-a-number", "fraction", "huge"],
)
def test_bad_content_length_is_4xx_or_closed(bad_server, content_length):
    """h11 refuses these before the app runs: a plain-text 400 (no OpenAI body is possible there) or a close."""
    request = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    raw, elapsed = raw_request(bad_server, request + b"Content-Length: " + content_length + b"\r\n\r\n{}")
    status = status_of(raw)
    assert status is None or 400 <= status < 500, raw[:200]
    assert elapsed < FAST


def headers_request(server: LiveServer, headers) -> tuple[int | None, float]:
    """(status, seconds); a status of None is a connection the server closed. Raw bytes: httpx itself takes seconds
    to build a request with 10,000 headers, and the time measured here is the server's."""
    lines = [b"GET /v1/models HTTP/1.1", b"Host: 127.0.0.1", *(f"{k}: {v}".encode() for k, v in headers)]
    raw, elapsed = raw_request(server, b"\r\n".join(lines) + b"\r\n\r\n")
    return status_of(raw), elapsed


TEN_THOUSAND_HEADERS = [(f"x-h{i}", "v") for i in range(10_000)]


def test_1mb_header_is_4xx_or_closed(bad_server):
    """CVE-2025-48956: h11 refuses a header block over 16 KB that is still incomplete (uvicorn: plain-text 400)."""
    status, elapsed = headers_request(bad_server, [("x-big", "a" * 2**20)])
    assert status is None or 400 <= status < 500
    assert elapsed < FAST


def test_10k_headers_never_a_5xx_or_a_hang(bad_server):
    status, elapsed = headers_request(bad_server, TEN_THOUSAND_HEADERS)
    assert status is None or status < 500
    assert elapsed < FAST


def test_10k_headers_are_refused(bad_server):
    status, _ = headers_request(bad_server, TEN_THOUSAND_HEADERS)
    assert status is None or 400 <= status < 500


# --- prompts too long for the context ----------------------------------------------------------------------------


def test_chat_prompt_over_the_context_is_context_length_exceeded(http):
    response, _ = post(http, CH, chat(messages=[{"role": "user", "content": "x " * 3000}]))
    assert_openai_error(response, 400, "context_length_exceeded", "messages")


def test_a_prompt_far_over_the_context_is_refused_fast_without_stalling_the_server(bad_server, http):
    result: list = []
    body = comp(prompt="x y " * 1_900_000)
    sender = threading.Thread(target=lambda: result.append(post(http, C, body)))
    sender.start()
    time.sleep(0.5)  # the big request is being read or tokenized
    with httpx.Client(base_url=bad_server.url, timeout=TIMEOUT) as other:
        start = time.monotonic()
        assert other.get("/health").status_code == 200
        health_latency = time.monotonic() - start
    sender.join(TIMEOUT)
    response, elapsed = result[0]
    assert_openai_error(response, 400, "context_length_exceeded", "prompt")
    assert elapsed < FAST and health_latency < 1.0, (elapsed, health_latency)


# --- endpoints outside the OpenAI models (app.py) ------------------------------------------------------------------


def test_tokenize_lone_surrogate_is_400(http):
    response, _ = post(http, TOK, {"prompt": "a\ud800"})
    assert_openai_error(response, 400, "invalid_request", "prompt")


def test_detokenize_bool_token_is_400(http):
    response, _ = post(http, DETOK, {"tokens": [1, True]})
    assert assert_openai_error(response, 400, "invalid_request")["param"].startswith("tokens")


def test_bad_model_path_is_404(http):
    response = http.get("/v1/models/%00%ff")
    assert_openai_error(response, 404, "model_not_found")
