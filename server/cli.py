"""The `dgserve` command line: `generate` (offline, no server) and `write-checkpoint`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import BlockCommitted, CanvasInit, Draft, Finished, SamplingParams
from models.hub import DEMO, RANDOM_DEMO, resolve_checkpoint
from models.quant import QUANTIZATION_CHOICES
from models.quantized_checkpoint import FORMATS, write_quantized_checkpoint
from models.random_checkpoint import WRITABLE, write_random_checkpoint

logger = logging.getLogger("dgserve")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas or spaces, got {text!r}") from None


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-request parameters; unset ones take the checkpoint's generation_config.json."""
    group = parser.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    group.add_argument("--max-tokens", type=int, help="output is cut to exactly this many tokens")
    group.add_argument("--steps", dest="max_denoising_steps", type=int, help="max denoising steps per canvas")
    group.add_argument("--entropy-bound", type=float, help="entropy-bound acceptance gamma")
    group.add_argument("--t-max", type=float, help="temperature of the first denoising step")
    group.add_argument("--t-min", type=float, help="temperature the schedule falls towards")
    group.add_argument("--stability-threshold", type=int, help="equal argmax canvases needed to stop early")
    group.add_argument("--confidence-threshold", type=float, help="mean entropy below which a canvas may stop")
    group.add_argument("--temperature", type=float, default=1.0, help="proposal temperature factor; 0 = argmax")
    group.add_argument("--seed", type=int, help="fix every random draw of the request")
    group.add_argument("--stop-token-ids", type=_token_ids, help="stop ids (default: the checkpoint's eos ids)")
    group.add_argument("--stream-prefix", action="store_true", help="print each canvas's settled prefix early")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        stop_token_ids=None if args.stop_token_ids is None else tuple(args.stop_token_ids),
        max_denoising_steps=args.max_denoising_steps,
        entropy_bound=args.entropy_bound,
        t_max=args.t_max,
        t_min=args.t_min,
        stability_threshold=args.stability_threshold,
        confidence_threshold=args.confidence_threshold,
        temperature=args.temperature,
        seed=args.seed,
        stream_drafts=args.drafts,
        stream_prefix=args.stream_prefix,
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
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=1,
        reference_mode=args.reference,
    )
    engine = Engine(config, progress=not args.json)
    try:
        engine.add_request("cli", prompt_ids, _sampling_params(args), canvas=_canvas(args, tokenizer))
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
    from server.lifecycle import DrainingServer, ServerState
    from server.metrics import Metrics
    from server.text import Tokenizer

    checkpoint = resolve_checkpoint(args.model)
    _warn_if_demo(args.model, checkpoint)
    name = args.served_model_name or ("dgserve-demo" if args.model in (None, DEMO) else args.model)
    metrics = Metrics(name)
    engine = AsyncEngine(
        EngineConfig(
            str(checkpoint),
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            kv_budget_bytes=args.kv_budget_bytes,
            kv_budget_fraction=args.kv_budget_fraction,
            max_waiting=args.max_waiting,
            prefill_chunk=args.prefill_chunk,
            max_num_batched_tokens=args.max_num_batched_tokens,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            max_capture_len=args.max_capture_len,
            fault_injection=os.environ.get("DGSERVE_TEST_FAULT"),
        ),
        on_step=metrics.on_step,
    )
    budget = engine.info.kv_budget_bytes
    metrics.on_start(engine.info)
    typical = engine.info.kv_bytes_for(1024, 1024)
    logger.info(
        "model %s from %s; KV budget %.1f GiB: %d sequences of 1K prompt + 1K output fit at once (max_num_seqs %d)",
        name, checkpoint, budget / 2**30, budget // typical, args.max_num_seqs,
    )  # fmt: skip
    local = args.host in LOCAL_HOSTS
    allowed = frozenset({*LOCAL_HOSTS, *args.allowed_hosts}) if local and "*" not in args.allowed_hosts else None
    config = ServerConfig(name, api_key=args.api_key, allowed_hosts=allowed, cors_origins=tuple(args.cors_origins),
                          playground=args.playground, stream_prefix=args.stream_prefix)  # fmt: skip
    state = ServerState()
    app = create_app(engine, Tokenizer(checkpoint), metrics, config, state)
    url = f"http://{args.host}:{args.port}"
    auth = " -H 'Authorization: Bearer $DGSERVE_API_KEY'" if args.api_key else ""
    if args.playground:
        logger.info("playground on %s/", url)
    logger.info(
        "serving on %s/v1; try:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json'%s "
        "-d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
        url, url, auth, name,
    )  # fmt: skip
    limits = ConnectionLimits(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        body_min_rate=args.body_min_rate,
        keep_alive_timeout=args.keep_alive_timeout,
        send_timeout=args.send_timeout,
        send_buffer=args.send_buffer,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        max_body_bytes=config.max_body_bytes,
    )
    # ws="none": no WebSocket routes, and an upgrade would take the connection out of the guard's hands.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5,
                                    http=ConnectionGuard(limits, metrics).protocol, ws="none")  # fmt: skip
    DrainingServer(uvicorn_config, state, engine, args.drain_timeout).run()


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"DGSERVE_{name}", default)


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """Every option also reads DGSERVE_<NAME> from the environment (for containers)."""
    serve.add_argument("--model", default=_env("MODEL", DEMO), help="checkpoint directory, hub id, demo, random-demo")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8000")))
    serve.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"), help="the model id clients use")
    serve.add_argument("--dtype", default=_env("DTYPE"), choices=["bfloat16", "float32"])
    serve.add_argument("--device", default=_env("DEVICE"))
    serve.add_argument(
        "--quantization",
        default=_env("QUANTIZATION"),
        choices=QUANTIZATION_CHOICES,
        help="quantize a bf16 checkpoint at load (FP8 and NVFP4 checkpoints are detected from their config)",
    )
    serve.add_argument("--max-num-seqs", type=int, default=int(_env("MAX_NUM_SEQS", "8")))
    serve.add_argument("--max-model-len", type=int, default=_int_or_none(_env("MAX_MODEL_LEN")))
    serve.add_argument("--max-waiting", type=int, default=int(_env("MAX_WAITING", "256")))
    serve.add_argument("--kv-budget-bytes", type=int, default=_int_or_none(_env("KV_BUDGET_BYTES")))
    serve.add_argument("--kv-budget-fraction", type=float, default=float(_env("KV_BUDGET_FRACTION", "0.9")))
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=int(_env("PREFILL_CHUNK", "2048")),
        help="prompt tokens a sequence encodes per iteration (bounds a long prompt's memory)",
    )
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=int(_env("MAX_NUM_BATCHED_TOKENS", "8192")),
        help="encoder tokens of one iteration, in whole chunks: what the start-up memory profile covers",
    )
    _add_off_switch(serve, "playground", "do not serve the web playground at /")
    serve.add_argument(
        "--stream-prefix",
        action=argparse.BooleanOptionalAction,
        default=bool(_bool_or_none(_env("STREAM_PREFIX"))),
        help="stream each canvas's settled leading tokens before it commits, for requests that leave "
        "diffusion.stream_prefix unset (default: off)",
    )
    serve.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=_bool_or_none(_env("COMPILE")),
        help="torch.compile the denoising step at start (default: on CUDA only)",
    )
    _add_off_switch(serve, "cuda_graphs", "run the compiled step without capturing it as CUDA graphs")
    serve.add_argument(
        "--max-capture-len",
        type=int,
        default=int(_env("MAX_CAPTURE_LEN", "8192")),
        help="CUDA graphs cover contexts up to this many tokens; longer ones run the compiled step uncaptured",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=float(_env("DRAIN_TIMEOUT", "30")),
        help="on SIGTERM, seconds in-flight requests get to finish before they are failed",
    )
    group = serve.add_argument_group("connection limits (slow or stalled clients)")
    group.add_argument(
        "--header-timeout",
        type=float,
        default=float(_env("HEADER_TIMEOUT", "5")),
        help="seconds for a request's headers to arrive, from its first byte (or the connection's opening)",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=float(_env("BODY_TIMEOUT", "10")),
        help="seconds for a request body to arrive, plus 1 s per --body-min-rate bytes it declares; then 408",
    )
    group.add_argument(
        "--body-min-rate",
        type=int,
        default=int(_env("BODY_MIN_RATE", str(64 * 2**10))),
        help="bytes per second a client may send its body as slowly as",
    )
    group.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=float(_env("KEEP_ALIVE_TIMEOUT", "5")),
        help="seconds an idle keep-alive connection stays open",
    )
    group.add_argument(
        "--send-timeout",
        type=float,
        default=float(_env("SEND_TIMEOUT", "30")),
        help="seconds a client may leave the server's writes blocked (not reading a stream) before it is cut off",
    )
    group.add_argument(
        "--send-buffer",
        type=int,
        default=int(_env("SEND_BUFFER", str(128 * 2**10))),
        help="bytes a connection may have waiting to be sent (in the kernel, and again in the server) before its "
        "writes block",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=int(_env("MAX_CONNECTIONS", "512")),
        help="open connections at most; more are answered 503 with Retry-After at once",
    )
    group.add_argument(
        "--max-connections-per-client",
        type=int,
        default=int(_env("MAX_CONNECTIONS_PER_CLIENT", "128")),
        help="open connections per client IP address at most (0: no such cap, e.g. behind a proxy)",
    )
    serve.add_argument(
        "--allowed-hosts",
        type=_names,
        default=_names(_env("ALLOWED_HOSTS", "")),
        help="extra Host names accepted when bound to loopback (comma-separated; '*' = any)",
    )
    serve.add_argument(
        "--cors-origins",
        type=_names,
        default=_names(_env("CORS_ORIGINS", "")),
        help="origins allowed by CORS (comma-separated); CORS is off without them",
    )


def _add_off_switch(parser: argparse.ArgumentParser, dest: str, help: str) -> None:
    """--no-<dest>: on unless given, or unless DGSERVE_<DEST>=0."""
    parser.add_argument(f"--no-{dest.replace('_', '-')}", dest=dest, action="store_false",
                        default=_env(dest.upper(), "1") != "0", help=help)  # fmt: skip


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_or_none(value: str | None) -> int | None:
    return None if value is None else int(value)


def _bool_or_none(value: str | None) -> bool | None:
    return None if value is None else value.lower() in ("1", "true", "yes", "on")


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
    gen.add_argument("--drafts", action="store_true", help="show the refining canvas after every step (stderr)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
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
