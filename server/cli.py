"""The `dgserve` command line: `generate` (offline, no server) and `write-checkpoint`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.device import DeviceUnavailableError, check_device
from engine.engine import Engine
from engine.memory import InsufficientMemoryError
from engine.request import DIFFUSION_OPTIONS, BlockCommitted, CanvasInit, Draft, Finished, Request, SamplingParams
from models.hub import DEMO, RANDOM_DEMO, resolve_checkpoint
from models.quant import QUANTIZATION_CHOICES
from models.quantized_checkpoint import FORMATS, write_quantized_checkpoint
from models.random_checkpoint import WRITABLE, write_random_checkpoint
from server.protocol import DiffusionOptions

logger = logging.getLogger("dgserve")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas or spaces, got {text!r}") from None


_ALIASES = {"stream_drafts": ("--drafts",)}  # older names that keep working


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-request parameters; unset ones take the checkpoint's generation_config.json. Each diffusion option is
    `--<name>`, typed as its SamplingParams field, with the help of its DiffusionOptions field."""
    group = parser.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    group.add_argument("--max-tokens", type=int, help="output is cut to exactly this many tokens")
    group.add_argument("--temperature", type=float, default=1.0, help="proposal temperature factor; 0 = argmax")
    group.add_argument("--seed", type=int, help="fix every random draw of the request")
    group.add_argument("--stop-token-ids", type=_token_ids, help="stop ids (default: the checkpoint's eos ids)")
    types = typing.get_type_hints(SamplingParams)
    for name in DIFFUSION_OPTIONS:
        flags = (f"--{name.replace('_', '-')}", *_ALIASES.get(name, ()))
        text = DiffusionOptions.model_fields[name].description
        # `int | None` -> int; a bool is a switch
        kind = next((t for t in typing.get_args(types[name]) if t is not type(None)), types[name])
        if kind is bool:
            group.add_argument(*flags, dest=name, action="store_true", help=text)
        else:
            group.add_argument(*flags, dest=name, type=kind, help=text)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    options = {name: value for name in DIFFUSION_OPTIONS if (value := getattr(args, name)) is not None}
    return SamplingParams(
        max_tokens=args.max_tokens,
        stop_token_ids=None if args.stop_token_ids is None else tuple(args.stop_token_ids),
        temperature=args.temperature,
        seed=args.seed,
        **options,
    )


def _spans(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, _, b in (span.partition(":") for span in text.split(",") if span.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END spans separated by commas, got {text!r}") from None


def _canvas(args: argparse.Namespace, tokenizer: AutoTokenizer) -> CanvasInit | None:
    """--canvas-ids / --canvas-text and --pinned as the first canvas's start."""
    if args.canvas_ids is None and args.canvas_text is None:
        if args.pinned:
            sys.exit("dgserve generate: --pinned needs --canvas-ids or --canvas-text")
        return None
    ids = (
        args.canvas_ids if args.canvas_ids is not None else tokenizer.encode(args.canvas_text, add_special_tokens=False)
    )
    return CanvasInit(tuple(ids), tuple(args.pinned or ()))


def _warn_if_demo(model: str | None, checkpoint: os.PathLike) -> None:
    if model in (None, DEMO):
        logger.warning("using the DEMO checkpoint at %s: a tiny model trained on the Python manual that writes like a "
                       "confused Python manual; real use needs the real checkpoint", checkpoint)  # fmt: skip
    elif model == RANDOM_DEMO:
        logger.warning("using the random-demo checkpoint at %s: random weights, the text is gibberish", checkpoint)


def _generate(args: argparse.Namespace) -> None:
    checkpoint = resolve_checkpoint(args.model)
    _warn_if_demo(args.model, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if args.prompt_ids is not None:
        prompt_ids = args.prompt_ids
    elif args.no_chat_template:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    else:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=args.enable_thinking,
        )
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    config = EngineConfig(
        str(checkpoint),
        device=_device(args.device),
        dtype=args.dtype,
        max_num_seqs=1,
        reference_mode=args.reference,
    )
    try:
        engine = Engine(config, progress=not args.json)
    except (DeviceUnavailableError, InsufficientMemoryError) as exc:
        sys.exit(f"dgserve generate: {exc}")
    try:
        engine.add_request(
            Request("cli", tuple(prompt_ids), _sampling_params(args), canvas_init=_canvas(args, tokenizer))
        )
    except ValueError as exc:
        sys.exit(f"dgserve generate: {exc}")
    started, tokens, finished = time.perf_counter(), [], None
    while engine.has_unfinished():
        for event in engine.step()[0]:
            if isinstance(event, BlockCommitted):
                tokens.extend(event.token_ids)
                if not args.json:
                    print(tokenizer.decode(event.token_ids, skip_special_tokens=True), end="", flush=True)
            elif isinstance(event, Draft) and not args.json:
                print(f"\r[draft step {event.step}] {tokenizer.decode(event.token_ids)[:60]!r}", file=sys.stderr)
            elif isinstance(event, Finished):
                finished = event
    seconds = time.perf_counter() - started
    if args.json:
        usage = finished.usage
        record = {
            "prompt_ids": prompt_ids,
            "token_ids": tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "finish_reason": finished.finish_reason.value,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "num_canvases": usage.num_canvases,
                "num_denoise_steps": usage.num_denoise_steps,
                "tokens_per_forward": round(usage.tokens_per_forward, 3),
            },
            "seconds": round(seconds, 3),
        }
        print(json.dumps(record))
    else:
        print()
        logger.info(
            "%d tokens in %.2f s (%s), %d denoising steps over %d canvases",
            len(tokens), seconds, finished.finish_reason.value, finished.usage.num_denoise_steps,
            finished.usage.num_canvases,
        )  # fmt: skip


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from engine.async_engine import AsyncEngine
    from server.app import LOCAL_HOSTS, ServerConfig, create_app
    from server.connections import ConnectionGuard, ConnectionLimits
    from server.lifecycle import DrainingServer, ServerState, local_url
    from server.metrics import Metrics
    from server.text import Tokenizer

    device = _device(args.device)
    try:
        if device is not None:  # before the weights are downloaded, not after
            check_device(torch.device(device), requested=True)
    except DeviceUnavailableError as exc:
        sys.exit(f"dgserve serve: {exc}")
    checkpoint = resolve_checkpoint(args.model)
    _warn_if_demo(args.model, checkpoint)
    name = args.served_model_name or ("dgserve-demo" if args.model in (None, DEMO) else args.model)
    metrics = Metrics(name)
    config = EngineConfig(str(checkpoint), device=device, **_fills(args, "engine"))
    try:
        engine = AsyncEngine(config, on_step=metrics.on_step)
    except (DeviceUnavailableError, InsufficientMemoryError) as exc:
        sys.exit(f"dgserve serve: {exc}")
    info = engine.info
    metrics.on_start(info)
    logger.info(
        "model %s from %s; KV budget %.1f GiB (%d pages of %d tokens): %d sequences of 1K prompt + 1K output fit at "
        "once (max_num_seqs %d)",
        name, checkpoint, info.kv_budget_bytes / 2**30, info.kv_num_pages, info.kv_page_tokens,
        info.kv_num_pages // info.kv_pages_for(1024, 1024), args.max_num_seqs,
    )  # fmt: skip
    if info.prefix_caching:
        logger.info(
            "prefix caching on: it may hold %.2f GiB of KV, the pool's pages that no request is using and %d pages of "
            "their sliding-layer KV (%.2f GiB)",
            info.prefix_cache_bytes / 2**30, info.prefix_cache_sliding_pages,
            info.prefix_cache_sliding_pages * info.prefix_cache_sliding_page_bytes / 2**30,
        )  # fmt: skip
    else:
        logger.info("prefix caching off: every prompt is encoded from its first token")
    # Whatever the bind address (a container binds 0.0.0.0): only these Host names are answered (DNS rebinding).
    allowed = None if "*" in args.allowed_hosts else frozenset({*LOCAL_HOSTS, *(h.lower() for h in args.allowed_hosts)})
    server_config = ServerConfig(name, allowed_hosts=allowed, cors_origins=tuple(args.cors_origins),
                                 **_fills(args, "server"))  # fmt: skip
    state = ServerState()
    app = create_app(engine, Tokenizer(checkpoint), metrics, server_config, state)
    url = local_url(args.host, args.port)
    auth = " -H 'Authorization: Bearer $DGSERVE_API_KEY'" if args.api_key else ""
    if args.playground:
        logger.info("playground on %s/", url)
    logger.info(
        "serving on %s/v1; try:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json'%s "
        "-d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
        url, url, auth, name,
    )  # fmt: skip
    limits = ConnectionLimits(**_fills(args, "limits"), max_body_bytes=server_config.max_body_bytes)
    # ws="none": no WebSocket routes, and an upgrade would take the connection out of the guard's hands.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5,
                                    http=ConnectionGuard(limits, metrics).protocol, ws="none")  # fmt: skip
    server = DrainingServer(uvicorn_config, state, engine, args.drain_timeout, args.drain_announce, args.url_file)
    server.run()
    # Exit without the interpreter's final collection of millions of objects (the tokenizer's, the model's): it took
    # 1-3.5 s, which a stop grace (Docker's: 10 s) must not spend after the drain. Not started: the port was taken.
    logging.shutdown()
    os._exit(0 if server.started else 1)


def _device(value: str | None) -> str | None:
    return None if value in (None, "auto") else value


@dataclass(frozen=True, slots=True)
class Flag:
    """One `dgserve serve` option, declared once: `--NAME`, its DGSERVE_<NAME> variable (for containers), and the
    config object whose field of the same name it fills."""

    name: str  # the flag without its dashes; dest and variable follow from it
    default: Any = None
    type: Callable[[str], Any] = str
    help: str | None = None
    kind: Literal["value", "toggle", "off"] = "value"  # toggle: --NAME/--no-NAME; off: on unless --no-NAME
    choices: tuple[str, ...] | None = None
    fills: Literal["engine", "limits", "server"] | None = None  # EngineConfig, ConnectionLimits, ServerConfig
    group: str | None = None
    field: str | None = None  # the config field it fills, where that is not named as the flag

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return f"DGSERVE_{self.dest.upper()}"

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        raw = os.environ.get(self.env)
        if self.kind == "off":
            parser.add_argument(f"--no-{self.name}", dest=self.dest, action="store_false",
                                default=raw is None or self._switch(raw), help=self.help)  # fmt: skip
        elif self.kind == "toggle":
            default = self.default if raw is None else self._switch(raw)
            parser.add_argument(f"--{self.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=self.help)  # fmt: skip
        else:
            default = self.default if raw is None else self.type(raw)
            parser.add_argument(f"--{self.name}", type=self.type, default=default, choices=self.choices,
                                help=self.help)  # fmt: skip

    def _switch(self, raw: str) -> bool:
        """A switch's variable; anything but these words is refused, so that a typo never flips it silently."""
        value = raw.strip().lower()
        if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SystemExit(f"dgserve: {self.env}={raw!r}: expected 1, true, yes, on or 0, false, no, off")
        return value in ("1", "true", "yes", "on")


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_LIMITS = "connection limits (slow or stalled clients)"
SERVE_FLAGS = (
    Flag("model", DEMO, help="checkpoint directory, hub id, demo, random-demo"),
    Flag("host", "127.0.0.1"),
    Flag("port", 8000, int),
    Flag("api-key", help="require 'Authorization: Bearer KEY'", fills="server"),
    Flag("served-model-name", help="the model id clients use"),
    Flag("dtype", choices=("bfloat16", "float32"), fills="engine"),
    Flag("device", "auto", help="auto (CUDA if usable, else the CPU if the model fits its memory), cuda, cuda:1, cpu"),
    Flag("quantization", choices=QUANTIZATION_CHOICES, fills="engine",
         help="quantize a bf16 checkpoint at load (FP8 and NVFP4 checkpoints are detected from their config)"),
    Flag("max-num-seqs", 8, int, fills="engine"),
    Flag("max-model-len", None, int, fills="engine"),
    Flag("max-waiting", 256, int, fills="engine"),
    Flag("kv-budget-bytes", None, int, fills="engine"),
    Flag("kv-budget-fraction", 0.9, float, fills="engine"),
    Flag("prefill-chunk", 2048, int, fills="engine",
         help="prompt tokens a sequence encodes per iteration (bounds a long prompt's memory)"),
    Flag("max-num-batched-tokens", 8192, int, fills="engine",
         help="encoder tokens of one iteration, in whole chunks: what the start-up memory profile covers"),
    Flag("playground", kind="off", fills="server", help="do not serve the web playground at /"),
    Flag("stream-prefix", False, kind="toggle", fills="server",
         help="stream each canvas's settled leading tokens before it commits, for requests that leave "
         "diffusion.stream_prefix unset (default: off)"),
    Flag("compile", None, kind="toggle", fills="engine",
         help="torch.compile the denoising step at start (default: on CUDA only)"),
    Flag("cuda-graphs", kind="off", fills="engine",
         help="run the compiled step without capturing it as CUDA graphs"),
    Flag("max-capture-len", 8192, int, fills="engine",
         help="CUDA graphs cover contexts up to this many tokens; longer ones run the compiled step uncaptured"),
    Flag("prefix-caching", kind="off", fills="engine", field="enable_prefix_caching",
         help="encode every prompt whole: share no prompt pages between requests"),
    Flag("prefix-cache-fraction", 0.2, float, fills="engine",
         help="share of the KV budget (after the sliding-window rings) that keeps the sliding layers' KV of cached "
         "pages; the full-layer pages are cached in whatever the pool has free"),
    Flag("drain-timeout", 30.0, float,
         help="on SIGTERM, seconds (counted from the signal) in-flight requests get to finish before they are failed"),
    Flag("drain-announce", 5.0, float,
         help="on SIGTERM, seconds during which /health and /ready answer 503 while new requests are still served, "
         "so that routers stop sending first (part of --drain-timeout; 0: refuse new requests at once)"),
    Flag("url-file", help="once listening, write the server's local URL (http://127.0.0.1:PORT) to this file (the "
         "image's health check reads it)"),
    Flag("header-timeout", 5.0, float, fills="limits", group=_LIMITS,
         help="seconds for a request's headers to arrive, from its first byte (or the connection's opening)"),
    Flag("body-timeout", 10.0, float, fills="limits", group=_LIMITS,
         help="seconds for a request body to arrive, plus 1 s per --body-min-rate bytes it declares; then 408"),
    Flag("body-min-rate", 64 * 2**10, int, fills="limits", group=_LIMITS,
         help="bytes per second a client may send its body as slowly as"),
    Flag("keep-alive-timeout", 5.0, float, fills="limits", group=_LIMITS,
         help="seconds an idle keep-alive connection stays open"),
    Flag("send-timeout", 30.0, float, fills="limits", group=_LIMITS,
         help="seconds a client may leave the server's writes blocked (not reading a stream) before it is cut off"),
    Flag("send-buffer", 128 * 2**10, int, fills="limits", group=_LIMITS,
         help="bytes a connection may have waiting to be sent (in the kernel, and again in the server) before its "
         "writes block"),
    Flag("max-connections", 512, int, fills="limits", group=_LIMITS,
         help="open connections at most; more are answered 503 with Retry-After at once"),
    Flag("max-connections-per-client", 128, int, fills="limits", group=_LIMITS,
         help="open connections per client IP address at most (0: no such cap, e.g. behind a proxy)"),
    Flag("allowed-hosts", [], _names,
         help="Host names answered besides localhost, 127.0.0.1 and ::1, whatever the bind address "
         "(comma-separated; '*' = any, which opens the server to DNS rebinding)"),
    Flag("cors-origins", [], _names, help="origins allowed by CORS (comma-separated); CORS is off without them"),
)  # fmt: skip


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in SERVE_FLAGS:
        flag.add_to(serve if flag.group is None else groups.get(flag.group) or groups.setdefault(
            flag.group, serve.add_argument_group(flag.group)))  # fmt: skip


def _fills(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """The parsed values of the flags that fill `target`, by field name."""
    return {flag.field or flag.dest: getattr(args, flag.dest) for flag in SERVE_FLAGS if flag.fills == target}


def _write_checkpoint(args: argparse.Namespace) -> None:
    if args.format == "bf16":
        path = write_random_checkpoint(
            args.directory, args.size, seed=args.seed, dtype=getattr(torch, args.dtype), num_shards=args.shards
        )
    else:
        path = write_quantized_checkpoint(args.directory, args.format, args.size, args.seed, args.shards, args.twin)
    logger.info("wrote a random-weight %s %s checkpoint to %s", args.size, args.format, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description="Serve block-diffusion language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    gen = commands.add_parser(
        "generate", help="generate offline from the command line, no server", description="Generate one reply."
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (the chat template is applied unless --no-chat-template)")
    source.add_argument("--prompt-ids", type=_token_ids, help="prompt as token ids, used as given")
    gen.add_argument("--model", default=DEMO, help="checkpoint directory, hub id, 'demo' or 'random-demo'")
    gen.add_argument("--no-chat-template", action="store_true", help="encode --prompt as plain text")
    start = gen.add_mutually_exclusive_group()
    start.add_argument("--canvas-ids", type=_token_ids, help="start the first canvas from these ids (warm start)")
    start.add_argument("--canvas-text", help="start the first canvas from this text's tokens (edit in place)")
    gen.add_argument("--pinned", type=_spans, help="canvas positions START:END,... of the warm start kept fixed")
    gen.add_argument("--enable-thinking", action="store_true", help="chat template with the thinking channel on")
    gen.add_argument("--reference", action="store_true", help="exact transformers generate() mode (global RNG)")
    gen.add_argument("--json", action="store_true", help="print one JSON record: token ids, text, usage")
    gen.add_argument("--device", default="auto", help="auto (CUDA if usable, else a CPU it fits), cuda, cpu")
    gen.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    gen.add_argument("--quantization", choices=QUANTIZATION_CHOICES, help="quantize a bf16 checkpoint at load")
    _add_sampling_arguments(gen)
    gen.set_defaults(run=_generate)

    write = commands.add_parser(
        "write-checkpoint",
        help="write a random-weight DiffusionGemma checkpoint in the real on-disk format",
        description="Write config.json, generation_config.json, safetensors and tokenizer files with random weights.",
    )
    write.add_argument("directory", help="output directory (created if missing)")
    write.add_argument("--size", choices=WRITABLE, default="demo")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    write.add_argument("--shards", type=int, default=1, help="split the weights over this many safetensors files")
    write.add_argument("--format", choices=["bf16", *FORMATS], default="bf16", help="a published quantized format")
    write.add_argument("--twin", help="with --format: also write the dequantised bf16 twin into this directory")
    write.set_defaults(run=_write_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.run(args)
