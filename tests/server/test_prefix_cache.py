"""Prefix caching as clients see it (README "Prefix caching"), through the official OpenAI and Anthropic clients
against live servers: the shared server (prefix caching on, the default) and one started with --no-prefix-caching.
The tiny checkpoint's KV page is one canvas, 32 tokens; a hit covers whole pages of the prompt."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import LiveServer, start_server, stop_server

PAGE = 32
# temperature 0 and a seed: a reply depends on the prompt alone, so served warm and cold it must be the same tokens.
GREEDY = {"temperature": 0, "seed": 5, "extra_body": {"ignore_eos": True, "diffusion": {"steps": 2}}}
SYSTEM = "You are a careful assistant who answers questions about the Python standard library. " * 4


@pytest.fixture(scope="module")
def cold(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("cold") / "server.log"
    # One thread: beside the shared server on two cores, OpenMP threads that spin would slow both.
    live = start_server(tiny_checkpoint, log, "--no-prefix-caching", env={"OMP_NUM_THREADS": "1"})
    yield live
    stop_server(live)


def salted() -> dict:
    """GREEDY with a salt of its own, so that nothing another test sent can be hit."""
    return {**GREEDY, "extra_body": {**GREEDY["extra_body"], "cache_salt": uuid.uuid4().hex}}


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def full_pages(tokens: int) -> int:
    """Tokens of a prompt's full pages, less a last page that ends the prompt (it may be encoded, not read, so that
    the prompt's last position is computed)."""
    return (tokens - 1) // PAGE * PAGE


def metric(server: LiveServer, name: str) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def test_a_second_turn_reads_the_first_from_the_cache_and_replies_as_without_it(client, server, cold):
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does itertools.chain do?"}]
    options = salted()
    first = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=PAGE, **options)
    assert first.usage.prompt_tokens >= 3 * PAGE and cached(first.usage) == 0  # a salt nobody used: nothing to hit
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And itertools.islice?"}]  # fmt: skip
    second = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=PAGE, **options)
    hit = cached(second.usage)
    assert 2 * PAGE <= hit <= second.usage.prompt_tokens and hit % PAGE == 0  # the system prompt and turn 1 at least

    # The same request again (streamed, the usage in its last chunk) finds all its full pages.
    stream = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=PAGE, stream=True,
                                            stream_options={"include_usage": True}, **options)  # fmt: skip
    chunks = list(stream)
    again = chunks[-1].usage
    assert again.prompt_tokens == second.usage.prompt_tokens
    assert full_pages(again.prompt_tokens) <= cached(again) <= again.prompt_tokens and cached(again) % PAGE == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # Served cold, the same turn gives the same reply, token for token.
    reference = cold.client().chat.completions.create(model="tiny", messages=turn2, max_tokens=PAGE, **GREEDY)
    assert cached(reference.usage) == 0 and reference.usage.prompt_tokens == second.usage.prompt_tokens
    assert second.choices[0].message.content == reference.choices[0].message.content == streamed


def test_a_cache_salt_keeps_tenants_apart(client, server):
    prompt = list(range(1000, 1000 + 3 * PAGE + 4))  # token ids: 3 full pages and a part
    salt, other = uuid.uuid4().hex, uuid.uuid4().hex
    request = dict(model="tiny", prompt=prompt, max_tokens=8, **GREEDY)
    body = {**GREEDY["extra_body"], "cache_salt": salt}
    first = client.completions.create(**{**request, "extra_body": body})
    assert cached(first.usage) == 0
    same = client.completions.create(**{**request, "extra_body": body})
    assert cached(same.usage) == 3 * PAGE
    stranger = client.completions.create(**{**request, "extra_body": {**body, "cache_salt": other}})
    assert cached(stranger.usage) == 0
    pair = client.completions.create(**{**request, "n": 2, "extra_body": body})  # one prompt: counted once
    assert pair.usage.prompt_tokens == len(prompt) and cached(pair.usage) == 3 * PAGE
    assert same.choices[0].text == stranger.choices[0].text == first.choices[0].text
    with server.http() as http:  # what a router's render call sees
        rendered = http.post("/v1/completions/render", json={"prompt": prompt, "cache_salt": salt}).json()
    assert rendered[0]["cache_salt"] == salt


@pytest.mark.parametrize("salt", [7, "", "x" * 257, ["a"]])
def test_a_bad_cache_salt_is_a_400_naming_it(client, server, salt):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"cache_salt": salt})  # fmt: skip
    assert err.value.param == "cache_salt"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="Hi", extra_body={"cache_salt": salt})
    assert err.value.param == "cache_salt"
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=1).usage.prompt_tokens > 0  # still serving


def test_responses_report_cached_input_tokens(client):
    request = dict(model="tiny", instructions=SYSTEM, input="Name one module.", max_output_tokens=8,
                   temperature=0, extra_body={"cache_salt": uuid.uuid4().hex, "diffusion": {"steps": 2}})  # fmt: skip
    first = client.responses.create(**request)
    assert first.usage.input_tokens_details.cached_tokens == 0
    again = client.responses.create(**request)
    hit = again.usage.input_tokens_details.cached_tokens
    assert full_pages(again.usage.input_tokens) <= hit <= again.usage.input_tokens and hit % PAGE == 0


def test_anthropic_input_tokens_leave_out_what_the_cache_read(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="EMPTY", max_retries=0)
    system = f"{uuid.uuid4().hex} {SYSTEM}"  # no salt on this API: new text, so nothing to hit at first
    messages = [{"role": "user", "content": "Name one module."}]
    request = dict(model="tiny", max_tokens=8, system=system, messages=messages,
                   extra_body={"seed": 1, "diffusion": {"steps": 2}})  # fmt: skip
    prompt = claude.messages.count_tokens(model="tiny", system=system, messages=messages).input_tokens
    first = claude.messages.create(**request)
    assert first.usage.input_tokens == prompt and first.usage.cache_read_input_tokens == 0
    again = claude.messages.create(**request)
    hit = again.usage.cache_read_input_tokens
    assert full_pages(prompt) <= hit and hit % PAGE == 0
    assert again.usage.input_tokens + hit == prompt and again.usage.cache_creation_input_tokens == 0
    with claude.messages.stream(**request) as stream:  # message_delta's usage replaces message_start's
        streamed = stream.get_final_message().usage
    assert streamed.cache_read_input_tokens == hit and streamed.input_tokens + hit == prompt


def test_metrics_count_prefix_cache_queries_hits_and_pages(client, server, cold):
    before = {name: metric(server, name) for name in ("dgserve_prefix_cache_queries_tokens_total",
                                                      "dgserve_prefix_cache_hits_tokens_total")}  # fmt: skip
    request = dict(model="tiny", prompt=list(range(1500, 1500 + 2 * PAGE + 1)), max_tokens=8, **salted())
    client.completions.create(**request)
    hit = cached(client.completions.create(**request).usage)
    assert hit == 2 * PAGE
    queries = metric(server, "dgserve_prefix_cache_queries_tokens_total") - before[
        "dgserve_prefix_cache_queries_tokens_total"]  # fmt: skip
    assert queries >= 2 * (2 * PAGE)  # both requests looked up their full pages
    assert metric(server, "dgserve_prefix_cache_hits_tokens_total") - before["dgserve_prefix_cache_hits_tokens_total"] \
        == hit  # fmt: skip
    # The vLLM names routers read are the same counters.
    assert metric(server, "vllm:prefix_cache_hits_total") == metric(server, "dgserve_prefix_cache_hits_tokens_total")
    assert metric(server, "vllm:prefix_cache_queries_total") == metric(
        server, "dgserve_prefix_cache_queries_tokens_total")  # fmt: skip
    assert metric(server, "dgserve_prefix_cache_pages") >= 2
    assert metric(server, "dgserve_prefix_cache_enabled") == 1
    assert metric(server, "dgserve_prefix_cache_capacity_bytes") >= metric(server, "dgserve_kv_cache_budget_bytes")
    assert "prefix caching on: it may hold" in server.logs()

    # Off: nothing is looked up, and startup and /metrics say so.
    cold.client().completions.create(**request)
    cold.client().completions.create(**request)
    assert metric(cold, "dgserve_prefix_cache_queries_tokens_total") == 0
    assert metric(cold, "dgserve_prefix_cache_hits_tokens_total") == metric(cold, "dgserve_prefix_cache_pages") == 0
    assert metric(cold, "dgserve_prefix_cache_enabled") == metric(cold, "dgserve_prefix_cache_capacity_bytes") == 0
    assert "prefix caching off" in cold.logs()
