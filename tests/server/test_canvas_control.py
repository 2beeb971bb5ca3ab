"""Canvas control over real HTTP: infill (`suffix`), a warm start with pinned positions (`diffusion.canvas`,
`diffusion.pinned`) and early streaming of the settled prefix (`diffusion.stream_prefix`), through the OpenAI client
and raw SSE; the tiny server for the mechanics, the demo server where canvases must actually settle."""

from __future__ import annotations

import json
import re
import time

import openai
import pytest

CHAT = [{"role": "user", "content": "What is the try statement?"}]


def sse(server, path: str, body: dict) -> list[tuple[float, str, dict]]:
    """(arrival time, event name, payload) of every SSE event of a streamed request, [DONE] excluded."""
    events, name = [], "message"
    with server.http() as http, http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.monotonic(), name, json.loads(line.removeprefix("data: "))))
                name = "message"
    return events


def content(events: list[tuple[float, str, dict]], key: str = "text") -> str:
    return "".join(e["choices"][0].get(key) or "" for _, name, e in events if name == "message" and e["choices"])


def chat_content(events: list[tuple[float, str, dict]]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for _, name, e in events if name == "message" and e["choices"]
    )


def metric(server, name: str) -> float:
    with server.http() as http:
        return float(re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M).group(1))


# --- infill ----------------------------------------------------------------------------------------------------------


def test_suffix_returns_the_middle_streamed_or_not_and_with_n(client, server):
    suffix = " and that is the end."
    kwargs = dict(model="tiny", prompt="The start of it", suffix=suffix, max_tokens=9, seed=4,
                  extra_body={"diffusion": {"steps": 6}})  # fmt: skip
    whole = client.completions.create(**kwargs, n=2)
    assert len(whole.choices) == 2 and whole.choices[0].text != whole.choices[1].text
    for choice in whole.choices:
        assert suffix.strip() not in choice.text and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 2 * 9
    extra = kwargs.pop("extra_body")
    streamed = sse(server, "/v1/completions", {**kwargs, **extra})
    kwargs["extra_body"] = extra
    assert content(streamed) == client.completions.create(**kwargs).choices[0].text == whole.choices[0].text


def test_the_suffix_is_pinned_right_after_the_middle(server):
    with server.http() as http:
        suffix = http.post("/tokenize", json={"prompt": " fixed tail"}).json()["tokens"]
    body = {"model": "tiny", "prompt": "Begin", "suffix": " fixed tail", "max_tokens": 6, "seed": 1,
            "diffusion": {"steps": 4, "stream_drafts": "tokens"}}  # fmt: skip
    events = sse(server, "/v1/completions", body)
    drafts = [e for _, name, e in events if name == "draft"]
    assert len(drafts) == 4
    with server.http() as http:
        pieces = [http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in suffix]
    for draft in drafts:  # a middle of 6 positions, the suffix's tokens fixed right after it
        assert draft["pinned"] == [[6, 6 + len(suffix)]] and draft["tokens"][6:] == pieces
        assert draft["states"][6:] == "p" * len(suffix) and "p" not in draft["states"][:6]


def test_suffix_that_cannot_be_honoured_is_a_400_naming_it(client):
    cases = [
        dict(suffix="word " * 400),  # longer than a canvas
        dict(suffix="x", extra_body={"response_format": {"type": "json_object"}}),
        dict(suffix="x", extra_body={"diffusion": {"canvas": "start"}}),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="p", max_tokens=4, **case)
        assert err.value.param == "suffix", case


def test_pins_with_a_grammar_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "p"}], max_tokens=4,
            response_format={"type": "json_object"}, extra_body={"diffusion": {"canvas": "{", "pinned": [[0, 1]]}},
        )  # fmt: skip
    assert err.value.param == "diffusion.pinned"


# --- warm start and pinned positions ---------------------------------------------------------------------------------


def test_a_warm_start_keeps_its_pinned_tokens_in_every_draft_and_in_the_reply(server):
    with server.http() as http:
        canvas = http.post("/tokenize", json={"prompt": "The quick brown fox jumps over the lazy dog"}).json()["tokens"]
    diffusion = {"steps": 5, "canvas": canvas, "pinned": [[0, 4], [6, 8]], "stream_drafts": "tokens"}
    body = {
        "model": "tiny",
        "prompt": [5, 6, 7],
        "max_tokens": 16,
        "seed": 2,
        "ignore_eos": True,
        "diffusion": diffusion,
    }
    events = sse(server, "/v1/completions", body)
    drafts = [e for _, name, e in events if name == "draft"]
    with server.http() as http:
        pieces = [http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in canvas]
    assert len(drafts) == 5
    for draft in drafts:
        assert draft["pinned"] == [[0, 4], [6, 8]]
        assert draft["tokens"][:4] == pieces[:4] and draft["tokens"][6:8] == pieces[6:8]
        assert draft["states"][:4] == "pppp" and draft["states"][6:8] == "pp" and "p" not in draft["states"][8:]
    assert content(events).startswith("".join(pieces[:4]))


@pytest.mark.parametrize(
    "diffusion, param",
    [
        ({"canvas": [10**6]}, "diffusion.canvas"),  # outside the vocabulary
        ({"canvas": list(range(3, 40))}, "diffusion.canvas"),  # longer than the tiny canvas of 32
        ({"canvas": [3, 4, 5], "pinned": [[2, 5]]}, "diffusion.pinned"),  # out of range
        ({"canvas": [3, 4, 5], "pinned": [[0, 2], [1, 3]]}, "diffusion.pinned"),  # overlapping
        ({"canvas": [3, 4, 5], "pinned": [[2, 2]]}, "diffusion.pinned"),  # empty
        ({"pinned": [[0, 1]]}, "diffusion.pinned"),  # nothing to pin
        ({"canvas": [3, 4, 5], "pinned": [[0]]}, "diffusion.pinned.0.1"),
        ({"canvas": []}, "diffusion.canvas"),
        ({"stream_prefix": "yes"}, "diffusion.stream_prefix"),
    ],
)
def test_bad_canvas_input_is_a_400_naming_the_parameter(client, diffusion, param):
    for create in (
        lambda: client.completions.create(model="tiny", prompt="p", max_tokens=4, extra_body={"diffusion": diffusion}),
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "p"}], max_tokens=4, extra_body={"diffusion": diffusion}
        ),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            create()
        assert err.value.param.startswith(param.split(".0")[0]) and err.value.status_code == 400, err.value.param
    assert client.completions.create(model="tiny", prompt="p", max_tokens=2).choices[0].text is not None


# --- early streaming -------------------------------------------------------------------------------------------------


def test_stream_prefix_sends_settled_text_before_the_canvas_commits_and_never_changes_it(demo_server):
    body = {"model": "tiny", "messages": CHAT, "seed": 0,
            "diffusion": {"stream_prefix": True, "stream_drafts": "tokens"}}  # fmt: skip
    before = metric(demo_server, "dgserve_time_to_first_token_seconds_count")
    events = sse(demo_server, "/v1/chat/completions", body)
    kinds = [("draft" if name == "draft" else "content") for _, name, e in events
             if name == "draft" or (e["choices"] and e["choices"][0]["delta"].get("content"))]  # fmt: skip
    first_content = kinds.index("content")
    assert "draft" in kinds[first_content:], "content came only after the last draft: nothing was streamed early"
    # Every draft after some content was sent keeps that content's tokens, pinned, at the canvas's head.
    sent = ""
    for _, name, e in events:
        if name == "draft":
            head = "".join(e["tokens"][: e["pinned"][0][1]]) if e["pinned"] and e["pinned"][0][0] == 0 else ""
            assert head.startswith(sent), (head, sent)
        elif e["choices"]:
            sent += e["choices"][0]["delta"].get("content") or ""
    client = demo_server.client()
    whole = client.chat.completions.create(model="tiny", messages=CHAT, seed=0,
                                           extra_body={"diffusion": {"stream_prefix": True}})  # fmt: skip
    assert chat_content(events) == whole.choices[0].message.content != ""
    assert metric(demo_server, "dgserve_time_to_first_token_seconds_count") == before + 2


def test_stream_prefix_through_the_openai_client_gives_the_same_text(demo_server):
    client = demo_server.client()
    chunks = client.chat.completions.create(model="tiny", messages=CHAT, seed=1, stream=True,
                                            extra_body={"diffusion": {"stream_prefix": True}})  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # the settled prefix, then the rest
    whole = client.chat.completions.create(model="tiny", messages=CHAT, seed=1,
                                           extra_body={"diffusion": {"stream_prefix": True}})  # fmt: skip
    assert "".join(pieces) == whole.choices[0].message.content
