"""What routers and llm-d's endpoint picker read from a replica, against a live `dgserve serve`: the `vllm:` metrics
(parsed with prometheus_client's own parser), vLLM's render endpoints and `/get_load`."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.test_lifecycle import LONG, wait_for
from tests.server.test_errors_and_endpoints import assert_openai_error

TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens": "counter",  # the parser names a counter's family without _total
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter",  # in prompt tokens, as vLLM's V1 engine counts them
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def scrape(http: httpx.Client) -> dict[str, dict[str, float]]:
    """Every sample as {sample name: {labels in a fixed order: value}}; the vllm: ones must be labelled tiny."""
    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith("vllm:") and "model_name" not in s.labels:
                raise AssertionError(f"{s.name} has no model_name label")
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
            samples.setdefault(s.name, {})[labels] = s.value
    return samples


def value(samples: dict[str, dict[str, float]], name: str, labels: str = "") -> float:
    return samples[name][labels]


def scrape_until(http: httpx.Client, predicate, message: str) -> dict[str, dict[str, float]]:
    """The first scrape for which `predicate` holds (within 20 s)."""
    last: dict[str, dict[str, float]] = {}

    def check() -> bool:
        nonlocal last
        last = scrape(http)
        return predicate(last)

    wait_for(check, 20, message)
    return last


def test_vllm_metrics_have_vllms_types_and_follow_the_load_back_to_zero(server):
    with server.http() as http:
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        assert {name: families[name].type for name in TYPES} == TYPES
        (config,) = families["vllm:cache_config_info"].samples
        assert config.value == 1 and config.labels["model_name"] == "tiny"
        pages = int(config.labels["num_gpu_blocks"])
        assert pages > 0 and int(config.labels["block_size"]) > 0

        # More streams than --max-num-seqs (8): some run, the rest wait; closing them aborts all.
        body = {**LONG, "stream": True, "diffusion": {"steps": 4}}
        opened, close = threading.Semaphore(0), threading.Event()

        def stream() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body):
                opened.release()
                close.wait(60)

        threads = [threading.Thread(target=stream) for _ in range(10)]
        for t in threads:
            t.start()
        for _ in threads:
            assert opened.acquire(timeout=60)
        wait_for(lambda: http.get("/get_load").json() == {"load": 10}, 10, "/get_load never counted 10 requests")
        running, waiting = "vllm:num_requests_running", "vllm:num_requests_waiting"
        loaded = scrape_until(http, lambda s: value(s, running) >= 1 and value(s, waiting) >= 1
                              and value(s, running) + value(s, waiting) == 10,
                              "no scrape showed the 10 requests running or waiting")  # fmt: skip
        usage = value(loaded, "vllm:kv_cache_usage_perc")
        assert 0 < usage <= 1 and round(usage * pages, 6).is_integer()  # a fraction of whole pages
        assert value(loaded, "vllm:gpu_cache_usage_perc") == usage
        close.set()
        for t in threads:
            t.join(timeout=30)

        names = (running, waiting, "vllm:kv_cache_usage_perc")
        scrape_until(http, lambda s: all(value(s, n) == 0 for n in names), "running, waiting or KV usage stayed up")
        assert http.get("/get_load").json() == {"load": 0}

        before = scrape(http)
        done = http.post("/v1/completions", json={**LONG, "max_tokens": 8, "diffusion": {"steps": 2}}).json()
        after = scrape(http)
    assert value(after, "vllm:request_success_total", "finished_reason=length") == (
        value(before, "vllm:request_success_total", "finished_reason=length") + 1
    )
    counted = {"prompt_tokens_total": 1, "generation_tokens_total": 8, "e2e_request_latency_seconds_count": 1,
             "time_to_first_token_seconds_count": 1}  # fmt: skip
    for name, added in counted.items():
        vllm, ours = f"vllm:{name}", f"dgserve_{name}"
        assert value(after, vllm) == value(after, ours) == value(before, ours) + added, name  # one source
    assert done["usage"] == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 1}


def test_render_gives_the_prompt_tokens_generation_would_use_and_the_same_errors(server):
    with server.http() as http:
        generated = value(scrape(http), "dgserve_generation_tokens_total")
        for prompts in (["hello world", "goodbye"], [[5, 6, 7]]):
            rendered = http.post("/v1/completions/render", json={"model": "tiny", "prompt": prompts, "max_tokens": 9})
            assert rendered.status_code == 200
            expected = [p if isinstance(p, list) else http.post("/tokenize", json={"prompt": p}).json()["tokens"]
                        for p in prompts]  # fmt: skip
            assert [r["token_ids"] for r in rendered.json()] == expected
            assert {(r["model"], r["sampling_params"]["max_tokens"]) for r in rendered.json()} == {("tiny", 9)}

        with_tools = http.post("/v1/chat/completions/render", json={**CHAT, "tools": [TOOL]}).json()
        plain = http.post("/v1/chat/completions/render", json=CHAT).json()
        reply = http.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL]}).json()
        assert len(with_tools["token_ids"]) == reply["usage"]["prompt_tokens"]  # what generation encoded
        text = http.post("/detokenize", json={"tokens": with_tools["token_ids"]}).json()["prompt"]
        assert "get_weather" in text and "Weather in Paris?" in text
        assert len(plain["token_ids"]) < len(with_tools["token_ids"])
        # The same conversation as a Responses input renders to the same prompt.
        responses = http.post("/v1/responses/render", json={"model": "tiny", "input": CHAT["messages"]}).json()
        assert responses["token_ids"] == plain["token_ids"]

        for path, body, status, code, param in (
            ("/v1/chat/completions", {**CHAT, "diffusion": {"steps": 0}}, 400, "invalid_request", "diffusion.steps"),
            ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, 400, "context_length_exceeded", "messages"),
            ("/v1/chat/completions", {**CHAT, "model": "other"}, 404, "model_not_found", "model"),
            ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, "invalid_prompt", "prompt"),
            (
                "/v1/responses",
                {"model": "tiny", "input": "x", "diffusion": {"steps": 0}},
                400,
                "invalid_request",
                "diffusion.steps",
            ),
        ):
            generation = http.post(path, json=body)
            render = http.post(path + "/render", json=body)
            assert_openai_error(render, status, code, param)
            assert render.json() == generation.json()
        rendering_generated = value(scrape(http), "dgserve_generation_tokens_total") - generated
    assert rendering_generated == reply["usage"]["completion_tokens"]  # only the chat reply's tokens
