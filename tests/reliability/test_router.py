"""The fleet on loopback: two `dgserve serve` replicas with an API key and the settings docker-compose.fleet.yml gives
them, behind a real vllm-router (the pinned wheel's binary) started with the flags that file ships. The official
clients talk to the router; each replica's /metrics says what reached it."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.test_lifecycle import wait_for
from tests.server.conftest import API_KEY, LiveServer, free_port, start_server, stop_server, wait_ready
from tests.test_deploy import fleet_replica_env, fleet_router_flags


@dataclass
class Router:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)


def router_binary() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("vllm-router", path=path)
    if binary is None:
        if os.environ.get("CI"):  # CI installs the test extra: a missing router there is a failure, not a skip
            pytest.fail("no vllm-router in CI: the test extra installs vllm-router")
        pytest.skip("no vllm-router: pip install vllm-router==0.1.17 (in the test extra)")
    return binary


def start_router(replicas: list[LiveServer], log: Path, *extra: str) -> Router:
    port = free_port()
    command = [router_binary(), "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
               "--worker-urls", *[r.url for r in replicas], *fleet_router_flags(), *extra]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    router = Router(f"http://127.0.0.1:{port}", process, log)
    wait_ready(process, f"{router.url}/readiness", 60, log)
    return router


def stop_router(router: Router) -> None:
    router.process.terminate()
    try:
        router.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        router.process.kill()


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveServer]]:
    router_binary()  # skip before paying for two servers
    directory = tmp_path_factory.mktemp("fleet")
    env = fleet_replica_env() | {"OMP_NUM_THREADS": "1"}  # two replicas on two cores: OpenMP threads must not spin
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two start-ups overlap
        started = [pool.submit(start_server, tiny_checkpoint, directory / f"replica{i}.log", api_key=API_KEY, env=env)
                   for i in range(2)]  # fmt: skip
        live = [future.result() for future in started]
    yield live
    for server in live:
        stop_server(server)


@pytest.fixture(scope="module")
def router(replicas: list[LiveServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    live = start_router(replicas, tmp_path_factory.mktemp("router") / "router.log")
    yield live
    stop_router(live)


def counters(replicas: list[LiveServer], name: str, **labels: str) -> list[float]:
    """Per replica, the sum of `name`'s samples that carry `labels`."""
    values = []
    for server in replicas:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
        values.append(sum(s.value for s in samples if labels.items() <= s.labels.items()))
    return values


def test_the_openai_apis_reach_the_replicas_through_the_router(router, replicas):
    client = router.client()
    before = counters(replicas, "dgserve_prompt_tokens_total")
    assert [m.id for m in client.models.list()] == ["tiny"]
    text = client.completions.create(model="tiny", prompt="def f(", max_tokens=4,
                                     extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          extra_body={"ignore_eos": True, "diffusion": {"steps": 2}})  # fmt: skip
    assert text.usage.completion_tokens == 4 and chat.usage.completion_tokens == 4
    served = sum(counters(replicas, "dgserve_prompt_tokens_total")) - sum(before)
    assert served == text.usage.prompt_tokens + chat.usage.prompt_tokens


def test_a_bad_diffusion_option_comes_back_as_the_replicas_400(router):
    with pytest.raises(openai.BadRequestError) as raised:
        router.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, extra_body={"diffusion": {"steps": 0}})  # fmt: skip
    error = raised.value.body
    assert raised.value.status_code == 400 and error["param"] == "diffusion.steps", error
    assert error["message"] == "steps must be >= 1 and <= 1024, got 0"


def test_draft_events_arrive_as_the_replica_sends_them(router):
    """Each denoising step's draft is forwarded when it is made, not held until the reply ends."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 32, "stream": True, "ignore_eos": True,
            "diffusion": {"steps": 24, "stream_drafts": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=router.url, headers=headers, timeout=60) as http:
        sent = time.monotonic()
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            drafts = [time.monotonic() for line in response.iter_lines() if line == "event: draft"]
        end = time.monotonic()
    assert len(drafts) == 24
    # Held back, the drafts would all arrive at the end; forwarded, the first comes while most steps are still ahead
    # and the others spread over them (relative to the request's own time, whatever the machine's speed).
    assert drafts[0] - sent < 0.5 * (end - sent) and drafts[-1] - drafts[0] > 0.5 * (end - drafts[0]), (sent, drafts)


def test_cache_aware_keeps_each_long_prefix_on_its_own_replica(router, replicas):
    """Two system prompts sent together, round after round, each stay on one replica, a different one each.

    A prompt that matches neither replica's history goes to the less busy one, the first when both are idle (seen
    with vllm-router 0.1.17; README says so), so each round sends its second prompt while the first is being
    denoised (its first draft has arrived). The order alternates: round-robin would swap the replicas every round.
    Each replica's prompt-token counter tells which prompt reached it (their lengths differ)."""
    systems = [" ".join(f"{name} rule {i}: answer about module {name} in plain words." for i in range(n))
               for name, n in (("os", 12), ("sys", 6))]  # fmt: skip

    def body(system: str) -> dict:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which module?"}]
        diffusion = {"steps": 8, "stream_drafts": True}
        return {"model": "tiny", "messages": messages, "max_tokens": 16, "ignore_eos": True, "diffusion": diffusion}

    def placement(first: int, second: int) -> dict[int, int]:
        """Which replica each prompt reached, by prompt index."""
        before = counters(replicas, "dgserve_prompt_tokens_total")
        with (
            httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=body(systems[first]) | {"stream": True}) as stream,
        ):
            lines = stream.iter_lines()
            assert "event: draft" in lines  # the first prompt runs on its replica, with steps to go
            length = http.post("/v1/chat/completions", json=body(systems[second])).json()["usage"]["prompt_tokens"]
            collections.deque(lines, maxlen=0)
        served = [a - b for a, b in zip(counters(replicas, "dgserve_prompt_tokens_total"), before, strict=True)]
        assert length in served and 0 not in served, served  # one prompt on each replica
        return {second: served.index(length), first: 1 - served.index(length)}

    rounds = [placement(*order) for order in ((0, 1), (1, 0), (0, 1), (1, 0))]
    assert all(r == rounds[0] for r in rounds), rounds  # each prompt stays where it went first


def test_the_clients_key_is_checked_by_the_replicas(router, replicas):
    """The router forwards the client's Authorization on the routes it parses (models, completions, chat), so a wrong
    key gets each replica's 401. On /v1/responses and /v1/messages vllm-router 0.1.17 drops the client's headers
    (and never forwards x-api-key): behind it those routes fail closed, 401 whatever the key (README says so)."""
    refused = sum(counters(replicas, "dgserve_requests_total", status="401"))
    wrong = router.client("wrong-key")
    for call in (lambda c: c.models.list(),
                 lambda c: c.completions.create(model="tiny", prompt="x", max_tokens=1),
                 lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=1)):  # fmt: skip
        with pytest.raises(openai.AuthenticationError):
            call(wrong)
    for key in (API_KEY, "wrong-key"):
        with pytest.raises(openai.AuthenticationError):
            router.client(key).responses.create(model="tiny", input="x", max_output_tokens=1)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=router.url, api_key=key, max_retries=0).messages.create(
                model="tiny", max_tokens=1, messages=[{"role": "user", "content": "x"}])  # fmt: skip
    assert sum(counters(replicas, "dgserve_requests_total", status="401")) - refused >= 7  # the replicas said 401
    # Nor does the router check Host: a foreign name reaches a replica as the router's own (README says so).
    foreign = {"host": "evil.example", "authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{replicas[0].url}/v1/models", headers=foreign).status_code == 403
    assert httpx.get(f"{router.url}/v1/models", headers=foreign).status_code == 200


def test_a_router_given_the_key_serves_responses_and_messages_to_any_client(replicas, tmp_path):
    """With `--api-key` the router sends its own key on /v1/responses and /v1/messages: those APIs then work through
    it, and a client's wrong key is not checked there (README: publish such a router on loopback only)."""
    keyed = start_router(replicas, tmp_path / "keyed.log", "--api-key", API_KEY)
    fast = {"diffusion": {"steps": 1}}
    try:
        for key in (API_KEY, "wrong-key"):
            reply = keyed.client(key).responses.create(model="tiny", input="Hi", max_output_tokens=2, extra_body=fast)
            assert reply.usage.output_tokens >= 1  # a random model may stop at once
            claude = anthropic.Anthropic(base_url=keyed.url, api_key=key, max_retries=0)
            message = claude.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                                             extra_body=fast)  # fmt: skip
            assert message.usage.output_tokens >= 1
        with pytest.raises(openai.AuthenticationError):  # chat still carries the client's own key
            keyed.client("wrong-key").chat.completions.create(model="tiny", max_tokens=1,
                                                              messages=[{"role": "user", "content": "x"}])  # fmt: skip
    finally:
        stop_router(keyed)


def test_the_routers_side_calls_find_their_endpoints(replicas, tmp_path):
    """Before a chat or completion vllm-router asks both replicas for the prompt's tokens (POST .../render, falling
    back to /tokenize). The replicas serve those routes, so none of its calls is a 404. It sends its own key on them:
    behind a router without one they get each replica's 401 and it routes by the request's text alone."""
    keyed = start_router(replicas, tmp_path / "keyed.log", "--api-key", API_KEY)
    before = counters(replicas, "dgserve_requests_total", status="200")
    refused = [sum(counters(replicas, "dgserve_requests_total", status=str(s))) for s in (401, 404, 405)]
    try:
        client = keyed.client()
        client.completions.create(model="tiny", prompt="x", max_tokens=1, extra_body={"diffusion": {"steps": 1}})
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       extra_body={"diffusion": {"steps": 1}})  # fmt: skip
        client.responses.create(model="tiny", input="x", max_output_tokens=1, extra_body={"diffusion": {"steps": 1}})
    finally:
        stop_router(keyed)
    assert [sum(counters(replicas, "dgserve_requests_total", status=str(s))) for s in (401, 404, 405)] == refused
    rendered = [counters(replicas, "dgserve_requests_total", endpoint=e, status="200")
                for e in ("/v1/completions/render", "/v1/chat/completions/render", "/v1/responses/render")]  # fmt: skip
    assert all(sum(per_replica) >= 1 for per_replica in rendered), rendered
    assert sum(counters(replicas, "dgserve_requests_total", status="200")) > sum(before)


def test_sigterm_to_a_replica_under_load_costs_no_client_error(router, replicas):
    """Clients keep sending through the router while one replica is stopped (SIGTERM, as `docker compose stop`
    sends). Its /ready turns 503 at once while it keeps serving for the drain announce (DGSERVE_DRAIN_ANNOUNCE), longer
    than the router's health checks take to drop it; what reaches it anyway is served, or refused with a 503 that the
    router retries on the other replica. Allowed errors: none. Runs last: it stops a replica."""
    client = router.client()
    errors, done, stop = [], [], threading.Event()

    def send(worker: int) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            try:  # unrelated prompts: cache_aware spreads them over both replicas
                client.completions.create(model="tiny", prompt=f"{uuid.uuid4()} {worker} {n}", max_tokens=8,
                                          extra_body={"diffusion": {"steps": 2}})  # fmt: skip
                done.append(time.monotonic())
            except openai.APIError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: min(counters(replicas, "dgserve_requests_total", endpoint="/v1/completions", status="200")) > 0,
             60, "both replicas must be serving when one stops")  # fmt: skip
    stopped_at = time.monotonic()
    replicas[0].process.send_signal(signal.SIGTERM)
    replicas[0].process.wait(timeout=60)
    time.sleep(2.0)  # and on, with one replica left
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [], errors
    assert sum(t > stopped_at for t in done) >= 4, "requests kept being served after the stop"
