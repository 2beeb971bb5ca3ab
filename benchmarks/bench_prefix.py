"""An agent's conversation, served with the prefix cache and without it (`--no-prefix-caching`), through the OpenAI
client: per turn, time to first token, prompt tokens, the tokens read from the cache and those encoded, and the KV
memory the cache held (from /metrics). Greedy at a fixed seed, so it also says whether each turn's reply was the same
on both servers.

The workload: a system prompt of about --system-tokens tokens with six tool definitions, then --turns turns, each
appending the previous reply and a new user message (about 200 tokens a turn with the defaults). The servers run
one after the other on the same checkpoint: by default the real structure at tiny width (`structure`: 30 layers 5:1,
window 1024, the real vocabulary), written to a temporary directory, where encoding a 3K-token prompt is a visible
cost; on a GPU. On 2 CPU cores one of its turns takes minutes: there, `--size demo` (6 layers, window 1024) runs
the 16 turns in about 2 minutes.

    python -m benchmarks.bench_prefix                    # 8 turns, ~3K-token system prompt, the structure checkpoint
    python -m benchmarks.bench_prefix --size demo        # on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from benchmarks.bench_router import free_port
from benchmarks.bench_server import start_server
from models.hub import resolve_checkpoint
from models.random_checkpoint import WRITABLE, write_random_checkpoint

RULES = (
    "You are a coding agent working in a large Python repository. Read files before you change them, keep each change "
    "small, run the tests that cover it, and explain what you did in one short paragraph. "
)
TOOLS = [
    {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {arg: {"type": "string", "description": f"the {arg}"} for arg in args},
        "required": list(args)}}}
    for name, description, args in (
        ("read_file", "Read a file of the repository and return its text", ("path",)),
        ("write_file", "Replace a file's text", ("path", "text")),
        ("search", "Search the repository for a regular expression", ("pattern", "glob")),
        ("run_tests", "Run pytest on the given paths and return its summary", ("paths",)),
        ("list_dir", "List a directory", ("path",)),
        ("git_diff", "Show the working tree's diff against a revision", ("revision",)),
    )
]  # fmt: skip
ASK = (
    "Now open server/{0}.py, find where requests of kind {1} are parsed, and tell me which fields are checked, which "
    "are passed on unchanged, and which tests cover them; list the line numbers you looked at. "
)


@dataclass
class Turn:
    prompt: int
    cached: int
    ttft: float
    reply: str
    cache_bytes: float  # full-layer KV the cache held after the turn


def system_prompt(checkpoint: Path, tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    per_copy = len(tokenizer.encode(RULES, add_special_tokens=False))
    return RULES * max(1, tokens // per_copy)


def cache_bytes(http: httpx.Client) -> float:
    """Pages the prefix cache holds times the bytes of a full-layer page (budget / pages in the pool)."""
    values, pages = {}, 1
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            values[sample.name] = sample.value
            if sample.name == "vllm:cache_config_info":
                pages = int(sample.labels["num_gpu_blocks"])
    return values["dgserve_prefix_cache_pages"] * values["dgserve_kv_cache_budget_bytes"] / pages


def converse(url: str, system: str, turns: int, reply_tokens: int, steps: int, repeats: int) -> list[Turn]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=600)
    messages = [{"role": "system", "content": system}]
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": ASK.format(f"module_{turn}", turn) * repeats})
            started, first, parts, usage = time.perf_counter(), None, [], None
            stream = client.chat.completions.create(
                model="bench", messages=messages, tools=TOOLS, max_tokens=reply_tokens, temperature=0, seed=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "diffusion": {"steps": steps}},
            )  # fmt: skip
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content or choice.delta.tool_calls:
                        first = first or time.perf_counter() - started
                        parts.append(choice.delta.content or "")
            reply = "".join(parts)
            messages.append({"role": "assistant", "content": reply})
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            out.append(Turn(usage.prompt_tokens, cached, first or 0.0, reply, cache_bytes(http)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint directory or hub id (default: write --size)")
    parser.add_argument("--size", choices=WRITABLE, default="structure", help="random checkpoint to write")
    parser.add_argument("--turns", type=int, default=8, help="at least 2")
    parser.add_argument("--system-tokens", type=int, default=2600, help="system prompt (the tools add ~400)")
    parser.add_argument("--reply-tokens", type=int, default=100, help="each reply's length (EOS ignored)")
    parser.add_argument("--user-repeats", type=int, default=2, help="copies of the ~50-token request per user turn")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_prefix_"))
    if args.model is None:
        checkpoint = write_random_checkpoint(workdir / args.size, args.size, seed=0)
        label = f"random {args.size} checkpoint"
    else:
        checkpoint, label = resolve_checkpoint(args.model), args.model
    system = system_prompt(checkpoint, args.system_tokens)
    results = {}
    for name, flags in (("cache", ()), ("no cache", ("--no-prefix-caching",))):
        port = free_port()
        process = start_server(str(checkpoint), port, 1, workdir / f"{name.replace(' ', '_')}.log", *flags)
        try:
            results[name] = converse(f"http://127.0.0.1:{port}", system, args.turns, args.reply_tokens, args.steps,
                                     args.user_repeats)  # fmt: skip
        finally:
            process.terminate()
            process.wait(timeout=60)

    warm, cold = results["cache"], results["no cache"]
    print(f"{label}; {args.turns} turns, {args.reply_tokens}-token replies, {args.steps} steps; logs in {workdir}")
    print("turn | prompt | cached | encoded: cache  none | TTFT s: cache   none  ratio | same reply | cache KV MiB")
    for i, (w, c) in enumerate(zip(warm, cold, strict=True), 1):
        print(f"{i:4d} | {w.prompt:6d} | {w.cached:6d} |        {w.prompt - w.cached:6d} {c.prompt - c.cached:5d} | "
              f"       {w.ttft:6.2f} {c.ttft:6.2f} {c.ttft / max(w.ttft, 1e-9):6.2f} | "
              f"{'yes' if w.reply == c.reply else 'NO':>10} | {w.cache_bytes / 2**20:12.1f}")  # fmt: skip
    later = slice(1, None)  # turn 1 has nothing to hit
    print(f"turns 2-{args.turns}: encoded {sum(w.prompt - w.cached for w in warm[later])} tokens with the cache, "
          f"{sum(c.prompt - c.cached for c in cold[later])} without; median TTFT "
          f"{statistics.median(w.ttft for w in warm[later]):.2f} s against "
          f"{statistics.median(c.ttft for c in cold[later]):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
