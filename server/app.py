"""The FastAPI app: thin routes over `Serving`, plus the guard every request passes (request id, auth, body size,
request metrics) and the health, readiness, metrics and tokenizer endpoints, and what routers ask a replica (render,
load)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import AsyncEngine
from engine.request import DIFFUSION_OPTIONS, EngineDeadError, SamplingParams
from server.chat import chat_job
from server.completions import completion_job
from server.errors import ANTHROPIC_PREFIX, OpenAIError, anthropic_body, error_body, install_error_handlers
from server.lifecycle import ServerState
from server.messages import CountTokensRequest, MessagesRequest, messages_job, prompt
from server.metrics import Metrics
from server.playground import PLAYGROUND_PATHS, add_playground
from server.protocol import ChatCompletionRequest, CompletionRequest, Int, OpenAIModel
from server.responses import ResponsesRequest, ResponseStore, responses_job
from server.serving import Job, Serving
from server.structured import Grammars
from server.text import Tokenizer

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
# Everything else needs the key when one is set (fail closed). Routers poll these without one.
OPEN_PATHS = {"/health", "/ready", "/metrics", "/get_load"}
KNOWN_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
               "/v1/messages/count_tokens", "/v1/completions/render", "/v1/chat/completions/render",
               "/v1/responses/render", "/health",
               "/ready", "/metrics", "/get_load", "/version", "/tokenize", "/detokenize",
               "/tokenizer_info"}  # fmt: skip
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


MAX_HEADERS = 256  # uvicorn bounds header bytes, not their count
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    default_max_tokens: int = 4096  # chat requests without max_tokens, clamped to the context left
    # Host header names answered, whatever the bind address; None = any. With only the local names and those the
    # operator adds, a page a browser loaded from elsewhere cannot reach the server through DNS rebinding.
    allowed_hosts: frozenset[str] | None = None
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are configured
    playground: bool = True  # the web page at / (server/playground/)
    stream_prefix: bool = False  # diffusion.stream_prefix for requests that leave it unset


def host_name(host_header: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class RequestGuard:
    """Pure ASGI middleware, so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None
        # The page and its assets hold no data and a browser cannot send a key to load them: the page asks for it.
        self._open = OPEN_PATHS | (PLAYGROUND_PATHS if config.playground else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        inbound = headers.get("x-request-id", "")
        request_id = inbound if _REQUEST_ID.fullmatch(inbound) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = (
            path
            if path in KNOWN_PATHS or path in PLAYGROUND_PATHS
            else "/v1/models/{id}"
            if path.startswith("/v1/models/")
            else "/v1/responses/{id}"
            if path.startswith("/v1/responses/")
            else "other"
        )
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def reply(error: OpenAIError) -> None:
            anthropic = path.startswith(ANTHROPIC_PREFIX)
            body = json.dumps(anthropic_body(error.status, error.message) if anthropic else error.body()).encode()
            extra = [(b"www-authenticate", b"Bearer")] if error.status == 401 else []
            await send_with_id({"type": "http.response.start", "status": error.status,
                                "headers": [(b"content-type", b"application/json"), *extra]})  # fmt: skip
            await send_with_id({"type": "http.response.body", "body": body})

        try:
            if len(scope["headers"]) > MAX_HEADERS:
                return await reply(OpenAIError(431, f"more than {MAX_HEADERS} headers", "too_many_headers"))
            allowed = self.config.allowed_hosts
            if allowed is not None and host_name(headers.get("host", "")).lower() not in allowed:
                return await reply(OpenAIError(403, "this server does not answer requests for this Host; the operator "
                                               "can add the name with --allowed-hosts (DGSERVE_ALLOWED_HOSTS)",
                                               "forbidden_host"))  # fmt: skip
            preflight = scope["method"] == "OPTIONS"  # CORS preflights carry no credentials and serve no data
            if self._key is not None and path not in self._open and not preflight and not self._authorized(headers):
                return await reply(OpenAIError(401, "Incorrect API key provided.", "invalid_api_key"))
            if int(headers.get("content-length") or 0) > self.config.max_body_bytes:
                return await reply(self._too_large())
            await self.app(scope, self._limited(receive), send_with_id)
        except _BodyTooLarge:
            if not status["started"]:
                await reply(self._too_large())
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()

    def _authorized(self, headers: dict[str, str]) -> bool:
        """`Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key):
            return True
        return "x-api-key" in headers and hmac.compare_digest(headers["x-api-key"].strip().encode(), self._key)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"request body larger than {self.config.max_body_bytes} bytes", "content_too_large")

    def _limited(self, receive: Receive) -> Receive:
        """Count bytes of chunked bodies too: Content-Length alone can be absent."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.config.max_body_bytes:
                raise _BodyTooLarge(self.config.max_body_bytes)
            return message

        return wrapped


class TokenizeRequest(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    enable_thinking: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Int] = Field(max_length=1_000_000)


def create_app(
    engine: AsyncEngine, tokenizer: Tokenizer, metrics: Metrics, config: ServerConfig, state: ServerState
) -> FastAPI:
    grammars = Grammars(tokenizer.hf, engine.info.vocab_size, engine.info.stop_token_ids)
    serving = Serving(
        engine, tokenizer, grammars, metrics, config.model_name, config.default_max_tokens, config.stream_prefix
    )
    store = ResponseStore()
    max_model_len = engine.info.max_model_len

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.started = True
        logger.info("ready to serve %s", config.model_name)
        yield
        state.started = False
        engine.shutdown(timeout=10)

    app = FastAPI(title="dgserve", version=VERSION, lifespan=lifespan)
    install_error_handlers(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])  # fmt: skip

    # What a request that leaves the diffusion options unset gets: the checkpoint's values, then SamplingParams'.
    defaults = SamplingParams(stream_prefix=config.stream_prefix).resolve(engine.info.generation_defaults)
    diffusion_defaults = {name: getattr(defaults, name) for name in DIFFUSION_OPTIONS}

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "dgserve",
                "max_model_len": max_model_len, "canvas_length": engine.info.canvas_length,
                "diffusion": diffusion_defaults}  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", "model_not_found", "model")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        # Tokenizing a long prompt takes a while: off the event loop, so health checks and streams keep flowing.
        job = await asyncio.to_thread(completion_job, serving, body, f"cmpl-{request.state.request_id}")
        return await run(job, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        job = await asyncio.to_thread(chat_job, serving, body, f"chatcmpl-{request.state.request_id}")
        return await run(job, request)

    # vLLM's render endpoints: what a router that routes by prompt tokens asks each replica before it picks one.
    @app.post("/v1/completions/render")
    async def render_completions(body: CompletionRequest, request: Request) -> list[dict[str, Any]]:
        job = await asyncio.to_thread(completion_job, serving, body, f"cmpl-{request.state.request_id}")
        return serving.render(job)

    @app.post("/v1/chat/completions/render")
    async def render_chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        job = await asyncio.to_thread(chat_job, serving, body, f"chatcmpl-{request.state.request_id}")
        return serving.render(job)[0]

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        job = await asyncio.to_thread(responses_job, serving, store, body)
        return await run(job, request)

    @app.post("/v1/responses/render")
    async def render_responses(body: ResponsesRequest) -> dict[str, Any]:
        """What vllm-router asks before a Responses request: its rendered input (previous_response_id included)."""
        return serving.render(await asyncio.to_thread(responses_job, serving, store, body))[0]

    def stored(response_id: str) -> Any:
        if (item := store.get(response_id)) is None:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", "not_found", "response_id")
        return item

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return stored(response_id).body

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        stored(response_id)
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        job = await asyncio.to_thread(messages_job, serving, body)
        return await run(job, request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        ids, _, _ = await asyncio.to_thread(prompt, serving, body)
        return {"input_tokens": len(ids)}

    async def run(job: Job, request: Request) -> Response:
        if not state.accepting:
            message = "the server is shutting down" if state.draining else "the server is not ready"
            raise OpenAIError(503, message, "not_ready", retry_after=5)
        return await serving.respond(job, request)

    @app.get("/health")
    async def health() -> Response:
        try:
            engine.check_health()
        except EngineDeadError:
            return JSONResponse(error_body(503, "the engine is not running", "engine_dead"), status_code=503)
        if state.stopping:  # routers that check /health take this replica out before it stops accepting
            return JSONResponse(error_body(503, "the server is shutting down", "shutting_down"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        try:
            engine.check_health()
        except EngineDeadError:
            return JSONResponse(error_body(503, "the engine is not running", "engine_dead"), status_code=503)
        if not state.ready:
            return JSONResponse(error_body(503, "not ready", "not_ready"), status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/get_load")
    async def get_load() -> dict[str, int]:
        """What vllm-router's power_of_two policy polls: the requests queued or running here (each choice one)."""
        return {"load": engine.num_in_flight}

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": VERSION, "eager_step_buckets": list(engine.info.eager_buckets)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give exactly one of prompt or messages", "invalid_request", "prompt")
        try:
            ids = (tokenizer.encode(body.prompt) if body.prompt is not None
                   else tokenizer.chat_prompt_ids(body.messages, body.enable_thinking))  # fmt: skip
        except ValueError as exc:
            raise OpenAIError(400, f"cannot tokenize: {exc}", "invalid_request", "messages") from None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        if bad := [t for t in body.tokens if not 0 <= t < serving.vocab_size]:
            raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary", "invalid_request", "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenizer.info() | {"max_model_len": max_model_len}

    if config.playground:
        add_playground(app, config.api_key is not None)
    app.add_middleware(RequestGuard, config=config, metrics=metrics)
    return app
