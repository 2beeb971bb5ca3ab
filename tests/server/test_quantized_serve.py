"""`dgserve serve --model <FP8 checkpoint>` end to end through the openai client, and `write-checkpoint --format`
(issue 14)."""

from __future__ import annotations

from safetensors.torch import load_file

from models.quantized_checkpoint import write_quantized_checkpoint
from server.cli import build_parser
from tests.server.conftest import start_server, stop_server


def test_an_fp8_checkpoint_serves_through_the_openai_client(tmp_path):
    checkpoint = write_quantized_checkpoint(tmp_path / "fp8", "fp8", "tiny")
    server = start_server(checkpoint, tmp_path / "server.log")
    try:
        reply = server.client().completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=0)
        assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
        chat = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=5)  # fmt: skip
        assert chat.usage.completion_tokens == 5
        assert "fp8" in server.logs()
    finally:
        stop_server(server)


def test_write_checkpoint_writes_each_format_and_its_twin(tmp_path):
    for fmt in ("fp8", "nvfp4-modelopt", "nvfp4-ct"):
        args = build_parser().parse_args(["write-checkpoint", str(tmp_path / fmt), "--size", "tiny", "--format", fmt,
                                          "--twin", str(tmp_path / f"{fmt}-twin")])  # fmt: skip
        args.run(args)
        assert "model.decoder.layers.0.experts.0.down_proj.weight_scale" in load_file(
            tmp_path / fmt / "model.safetensors"
        )
        assert "model.decoder.layers.0.experts.down_proj" in load_file(tmp_path / f"{fmt}-twin" / "model.safetensors")
