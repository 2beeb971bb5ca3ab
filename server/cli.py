"""The `dgserve` command line."""

from __future__ import annotations

import argparse
import logging

import torch

from models.random_checkpoint import SIZES, write_random_checkpoint


def _write_checkpoint(args: argparse.Namespace) -> None:
    path = write_random_checkpoint(
        args.directory, args.size, seed=args.seed, dtype=getattr(torch, args.dtype), num_shards=args.shards
    )
    logging.getLogger("dgserve").info("wrote a random-weight %s checkpoint to %s", args.size, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description="Serve block-diffusion language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser(
        "write-checkpoint",
        help="write a random-weight DiffusionGemma checkpoint in the real on-disk format",
        description="Write config.json, generation_config.json, safetensors and tokenizer files with random weights.",
    )
    write.add_argument("directory", help="output directory (created if missing)")
    write.add_argument("--size", choices=sorted(SIZES), default="demo")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    write.add_argument("--shards", type=int, default=1, help="split the weights over this many safetensors files")
    write.set_defaults(run=_write_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.run(args)
