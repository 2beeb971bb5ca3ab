"""Error shapes and statuses, auth, request ids, health/ready/metrics and the tokenizer endpoints."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, start_server, stop_server


def assert_openai_error(response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"]
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
        ({"model": "tiny", "prompt": "x", "n": 1000}, "n"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": [-1]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "tiny", "prompt": "x", "stop": ["s"] * 100}, "stop"),
        ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, None),
        ({"model": "tiny", "prompt": "x", "diffusion": {"steps": 0}}, "diffusion.steps"),
        ({"model": "tiny", "prompt": "x", "diffusion": {"stepz": 3}}, "diffusion.stepz"),
        ({"model": "tiny"}, "prompt"),
    ],
)
def test_validation_failures_are_400_not_422(server, body, param):
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json=body), 400, "invalid_request", param)


def test_malformed_json_and_non_object_bodies_are_400(server):
    with server.http() as http:
        malformed = http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert_openai_error(malformed, 400, "invalid_request")
        assert_openai_error(http.post("/v1/completions", json=[1, 2]), 400, "invalid_request")


def test_context_length_exceeded(server):
    with server.http() as http:
        error = assert_openai_error(
            http.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 4000, "max_tokens": 200}),
            400, "context_length_exceeded", "prompt",
        )  # fmt: skip
    assert "maximum context length is 4096 tokens" in error["message"]


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.code == "model_not_found"
    with server.http() as http:
        assert_openai_error(http.get("/v1/models/gpt-4"), 404, "model_not_found")
        assert_openai_error(http.get("/no/such/route"), 404, "not_found")


def test_oversized_body_is_413(server):
    with server.http() as http:
        big = {"model": "tiny", "prompt": "x" * (9 * 2**20)}
        assert_openai_error(http.post("/v1/completions", json=big), 413, "content_too_large")


def test_models_health_ready_version_metrics(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "dgserve"
    client.completions.create(model="tiny", prompt="metrics", max_tokens=8, extra_body={"diffusion": {"steps": 1}})
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        version = http.get("/version").json()
        assert version["version"] and version["eager_step_buckets"] == []  # CPU: not compiled, nothing fell back
        text = http.get("/metrics").text
    assert "dgserve_graph_capture_failures 0.0" in text
    for name in ("dgserve_requests_total", "dgserve_prompt_tokens_total", "dgserve_generation_tokens_total",
                 "dgserve_generation_tokens_per_second", "dgserve_time_to_first_block_seconds_bucket",
                 "dgserve_e2e_request_latency_seconds_bucket", "dgserve_denoise_step_seconds_bucket",
                 "dgserve_denoise_steps_per_canvas_bucket", "dgserve_tokens_per_forward_bucket",
                 "dgserve_num_requests_running", "dgserve_num_requests_waiting", "dgserve_kv_cache_used_bytes",
                 "dgserve_kv_cache_budget_bytes"):  # fmt: skip
        assert name in text, name
    assert 'dgserve_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_request_id_is_echoed_or_generated(server):
    with server.http() as http:
        assert http.get("/v1/models", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
        generated = http.get("/v1/models", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]
    assert generated and " " not in generated


def test_tokenize_detokenize_and_tokenizer_info(server):
    with server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 4096
        assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hello world"}
        assert_openai_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "invalid_request", "tokens")
        info = http.get("/tokenizer_info").json()
    assert info["vocab_size"] == 2048 and "chat_template" in info


def anonymous_post(server, path: str, body: dict, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_api_key_protects_everything_but_health_ready_metrics_load(tiny_checkpoint, tmp_path):
    log = tmp_path / "auth.log"
    server = start_server(tiny_checkpoint, log, api_key=API_KEY)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            for path in ("/health", "/ready", "/metrics", "/get_load"):  # what routers poll, without the key
                assert anonymous.get(path).status_code == 200, path
            for path in ("/v1/models", "/version", "/tokenizer_info", "/v1/models/tiny", "/no-such-route"):
                assert_openai_error(anonymous.get(path), 401, "invalid_api_key")
            for path in ("/v1/completions", "/v1/chat/completions/render", "/v1/completions/render"):
                wrong = anonymous.post(path, json={}, headers={"Authorization": "Bearer nope"})
                assert_openai_error(wrong, 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in server.client().models.list()] == ["tiny"]
        count = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
        for headers in ({"x-api-key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):  # Anthropic's and ours
            assert anonymous_post(server, "/v1/messages/count_tokens", count, headers).status_code == 200
        for headers in ({}, {"x-api-key": "nope"}):
            refused = anonymous_post(server, "/v1/messages/count_tokens", count, headers)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.count_tokens(**count)
        claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
        assert claude.messages.count_tokens(**count).input_tokens > 0
    finally:
        stop_server(server)
    assert API_KEY not in log.read_text()


def test_a_full_queue_is_429_with_retry_after_before_any_200(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "busy.log", "--max-num-seqs", "1", "--max-waiting", "0")
    try:
        long = {"model": "tiny", "prompt": "x", "max_tokens": 4000 - 8, "ignore_eos": True, "stream": True}
        with server.http() as http, http.stream("POST", "/v1/completions", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept referenced: a collected iterator would close the connection
            while not next(lines).startswith("data: "):  # the first block: it is running
                pass
            for stream in (False, True):
                busy = http.post("/v1/completions", json={"model": "tiny", "prompt": "y", "stream": stream})
                assert_openai_error(busy, 429, "server_busy")
                assert busy.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                server.client().completions.create(model="tiny", prompt="z", max_tokens=2)
    finally:
        stop_server(server)
