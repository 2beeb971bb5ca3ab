"""The web playground at /, driven in Debian's chromium by Playwright against live `dgserve serve` processes (the
bundled demo checkpoint, with and without an API key; the random tiny one where a reply must run long), and the
token drafts it reads. Screenshots go to test-output/playground/."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from models.hub import DEMO_CHECKPOINT
from tests.server.conftest import API_KEY, LiveServer, start_server, stop_server

SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "playground"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:  # CI installs it (.ci/run): a missing browser is a broken setup, not a skip
        pytest.fail("chromium is not installed: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(DEMO_CHECKPOINT, tmp_path_factory.mktemp("keyed") / "server.log", api_key=API_KEY)
    yield live
    stop_server(live)


class Playground:
    """A page on the playground that records console errors, uncaught exceptions and the canvas frames it draws."""

    def __init__(self, browser: Browser, server: LiveServer, viewport: dict[str, int] = DESKTOP) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.response = self.page.goto(server.url + "/")

    def wait_until(self, expression: str, timeout: float = 60) -> None:
        """Poll from here: Playwright's wait_for_function evaluates strings in the page, which its CSP forbids."""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.02)

    def ready(self) -> None:
        self.wait_until("document.getElementById('model').textContent.includes('tiny')")

    def record_frames(self) -> None:
        """Every distinct canvas text the page shows, seen by a MutationObserver as each draft is drawn."""
        self.page.evaluate("""() => {
            window.__frames = new Set();
            const canvas = document.querySelector('[data-testid=canvas]');
            new MutationObserver(() => window.__frames.add(canvas.textContent))
                .observe(canvas, {childList: true, subtree: true, characterData: true});
        }""")

    def record_bodies(self) -> list[dict]:
        """The JSON bodies of the page's POST requests from now on, appended as they are sent."""
        bodies: list[dict] = []
        self.page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
        return bodies

    def frames(self) -> int:
        return self.page.evaluate("window.__frames.size")

    def set(self, **fields: str) -> None:
        for name, value in fields.items():
            self.page.fill(f"#{name}", value)

    def send(self, text: str) -> None:
        self.page.get_by_test_id("prompt").fill(text)
        self.page.get_by_test_id("send").click()

    def wait_idle(self, timeout: float = 60) -> None:
        self.wait_until("!document.querySelector('.turn.live')", timeout)

    def replies(self) -> list[str]:
        return self.page.locator(".turn.assistant .text").all_text_contents()

    def close(self) -> None:
        self.context.close()


def shoot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / name, full_page=True)


def running(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^dgserve_num_requests_running (\S+)$", text, re.M).group(1))


def test_page_loads_clean_with_csp_and_hooks(browser, demo_server):
    for viewport, name in ((DESKTOP, "empty-1280x800.png"), (PHONE, "empty-phone.png")):
        view = Playground(browser, demo_server, viewport)
        view.ready()
        csp = view.response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
        for hook in ("prompt", "send", "output", "canvas", "stop"):
            assert view.page.get_by_test_id(hook).is_visible(), hook
        assert view.page.get_by_test_id("api-key").count() == 1 and not view.page.get_by_test_id("api-key").is_visible()
        assert view.page.locator("#steps").get_attribute("placeholder") == "48"  # the checkpoint's default
        shoot(view.page, name)
        assert view.errors == []
        view.close()


def test_reply_denoises_on_the_canvas_then_lands_in_a_multi_turn_transcript(browser, demo_server):
    view = Playground(browser, demo_server)
    view.ready()
    bodies = view.record_bodies()
    view.record_frames()
    # A tiny entropy bound accepts about one position per step: the canvas crystallises slowly enough to watch.
    view.set(system="You answer from the Python manual.", steps="40", entropy_bound="0.0001", seed="0")
    view.send("Tell me about list displays.")
    view.wait_until("Number(document.querySelector('[data-testid=canvas]').dataset.frames) >= 8")
    shoot(view.page, "mid-denoising.png")
    assert view.page.locator("[data-testid=canvas] .tok.n").count() > 0  # still noise somewhere
    view.wait_idle()
    assert view.frames() >= 3
    first = view.replies()[0]
    assert first.startswith("A list")  # the demo model's taught sentence, mixed up by so few steps
    view.set(steps="", entropy_bound="")
    view.send('What is the "for" statement?')
    view.wait_idle()
    assert len(view.replies()) == 2 and view.replies()[1]
    stats = view.page.locator(".turn.assistant .stats").all_text_contents()
    assert all(re.search(r"first token .* s · .* tok/s · .* steps/canvas · .* tok/forward", s) for s in stats), stats
    second = bodies[-1]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == first
    assert second["chat_template_kwargs"] == {"enable_thinking": False}
    assert second["diffusion"] == {"stream_drafts": "tokens"}  # empty fields: the checkpoint's defaults
    shoot(view.page, "finished-conversation.png")
    view.page.set_viewport_size(PHONE)
    shoot(view.page, "finished-conversation-phone.png")
    assert view.errors == []
    view.close()


def test_early_streaming_shows_settled_text_before_the_canvas_commits(browser, demo_server):
    view = Playground(browser, demo_server)
    view.ready()
    bodies = view.record_bodies()
    view.page.check("#stream_prefix")
    view.set(seed="0")
    view.send("What is the try statement?")
    # Text in the live reply while the canvas below is still being refined: the settled prefix came early.
    view.wait_until("document.querySelector('.turn.live .text')?.textContent.length > 0 && "
                    "document.querySelector('[data-testid=canvas] .tok.p') !== null")  # fmt: skip
    shoot(view.page, "early-streaming.png")
    view.wait_idle()
    assert bodies[-1]["diffusion"] == {"stream_drafts": "tokens", "stream_prefix": True}
    assert view.replies()[0] and view.errors == []


def test_raw_completion_mode(browser, demo_server):
    view = Playground(browser, demo_server)
    view.ready()
    with view.page.expect_request("**/v1/completions") as request:
        view.page.check("input[value=completion]")
        view.set(max_tokens="24", steps="8")
        view.send("A list display is")
    view.wait_idle()
    assert json.loads(request.value.post_data)["prompt"] == "A list display is"
    assert view.replies()[0] and view.errors == []
    view.close()


def test_stop_aborts_and_frees_the_slot(browser, server):
    """The random tiny checkpoint never settles: at 1,024 steps a canvas runs until it is stopped."""
    view = Playground(browser, server)
    view.ready()
    view.set(steps="1024", max_tokens="2048")
    view.send("go on")
    view.wait_until("Number(document.querySelector('[data-testid=canvas]').dataset.frames) >= 3")
    assert running(server) == 1
    view.page.get_by_test_id("stop").click()
    deadline = time.monotonic() + 10
    while running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0
    view.wait_idle(5)
    assert "stopped" in view.page.locator(".turn.assistant .stats").first.text_content()
    view.set(steps="2", max_tokens="8")
    view.send("again")
    view.wait_idle()
    assert view.page.get_by_test_id("send").is_enabled() and len(view.replies()) == 2 and view.replies()[1]
    assert view.errors == []
    view.close()


def assert_inert(page: Page) -> None:
    assert page.evaluate("window.__xss") is None
    for area in ("output", "canvas"):
        assert page.locator(f"[data-testid={area}] img, [data-testid={area}] script").count() == 0


def test_markup_in_user_input_stays_text(browser, demo_server):
    view = Playground(browser, demo_server)
    view.ready()
    view.set(max_tokens="16")
    view.page.check("#thinking")
    with view.page.expect_request("**/v1/chat/completions") as request:
        view.send(XSS)
    view.wait_idle()
    assert json.loads(request.value.post_data)["chat_template_kwargs"] == {"enable_thinking": True}
    assert view.page.locator(".turn.user .text").text_content() == XSS
    assert_inert(view.page)
    assert view.errors == []
    view.close()


def test_markup_in_model_output_stays_text(browser, demo_server):
    """No checkpoint can be made to write markup on cue, so the real server's stream is taken and its model text
    (committed content and the draft tokens) replaced with markup on the way to the page."""

    def hostile(route: Route) -> None:
        response = route.fetch()
        events = []
        for event in response.text().split("\n\n"):
            name, _, data = event.rpartition("data: ")
            if data.startswith("{"):
                message = json.loads(data)
                if "tokens" in message:
                    message["tokens"][0] = XSS
                for choice in message.get("choices", []):
                    if choice["delta"].get("content"):
                        choice["delta"]["content"] = XSS
                data = json.dumps(message)
            events.append(name + "data: " + data if data else event)
        route.fulfill(response=response, body="\n\n".join(events))

    view = Playground(browser, demo_server)
    view.ready()
    view.page.route("**/v1/chat/completions", hostile)
    view.set(max_tokens="16", steps="4")
    view.send("Tell me about list displays.")
    view.wait_idle()
    assert XSS in view.replies()[0]
    assert XSS.replace("\n", "") in view.page.get_by_test_id("canvas").text_content()
    assert_inert(view.page)
    assert view.errors == []
    view.close()


def test_api_key_is_asked_once_and_kept(browser, keyed_demo):
    view = Playground(browser, keyed_demo)
    key = view.page.get_by_test_id("api-key")
    key.wait_for(state="visible")
    shoot(view.page, "api-key.png")
    assert view.errors == []  # the page learnt from /playground/config.json that a key is needed: no 401 probe
    key.fill(API_KEY)
    view.page.check("#remember-key")
    view.set(max_tokens="16", steps="8")
    view.send("Tell me about list displays.")  # Send takes the key in the field: no "Use key" click first
    view.ready()
    view.wait_idle()
    assert view.replies()[0] and view.errors == []
    assert view.page.evaluate("localStorage.getItem('dgserve-api-key')") == API_KEY
    view.page.reload()
    view.ready()  # the kept key: no question this time
    assert not key.is_visible() and view.errors == []
    view.close()


def test_token_drafts_wire_format(server):
    """`stream_drafts: "tokens"` adds per-position text and state; `true` keeps the text-only contract."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "stream": True, "seed": 1}
    with server.http() as http:
        drafts = {}
        for mode in (True, "tokens"):
            with http.stream(
                "POST", "/v1/completions", json=body | {"diffusion": {"steps": 5, "stream_drafts": mode}}
            ) as r:
                lines = list(r.iter_lines())
            drafts[mode] = [json.loads(lines[i + 1][6:]) for i, line in enumerate(lines) if line == "event: draft"]
    assert all(set(d) == {"id", "index", "step", "text", "pinned"} and d["pinned"] == [] for d in drafts[True])
    tokens = drafts["tokens"]
    assert [d["step"] for d in tokens] == [1, 2, 3, 4, 5] * 2  # two canvases of 32 (the last cut to 8)
    assert [d["text"] for d in tokens] == [d["text"] for d in drafts[True]]  # same seed: the same canvases
    previous: dict | None = None
    for d in tokens:
        assert len(d["tokens"]) == len(d["states"]) and set(d["states"]) <= set("nas")
        if d["step"] == 1:
            assert set(d["states"]) == {"n"}
        else:
            kept = [a == b for a, b in zip(d["tokens"], previous["tokens"], strict=True)]
            assert all(k for k, s in zip(kept, d["states"], strict=True) if s != "n")  # accepted/settled: unchanged
            assert all(s != "s" or p != "n" for s, p in zip(d["states"], previous["states"], strict=True))
        previous = d


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_playground_is_404(tiny_checkpoint, tmp_path, how):
    args, env = (("--no-playground",), None) if how == "flag" else ((), {"DGSERVE_PLAYGROUND": "0"})
    live = start_server(tiny_checkpoint, tmp_path / "server.log", *args, env=env)
    try:
        for path in ("/", "/playground/app.js", "/playground/style.css"):
            assert httpx.get(live.url + path).status_code == 404
        assert httpx.get(live.url + "/v1/models").status_code == 200
    finally:
        stop_server(live)


def test_page_keeps_the_host_check_and_cors_off(demo_server):
    """The page is open to any local client without a key, but a foreign Host (DNS rebinding) still gets 403, and
    without --cors-origins no CORS header is sent."""
    page = httpx.get(demo_server.url + "/", headers={"Origin": "http://evil.example"})
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers
    assert httpx.get(demo_server.url + "/", headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(demo_server.url + "/playground/app.js").headers["content-type"].startswith("text/javascript")
