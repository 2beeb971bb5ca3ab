"""Session fixtures: tiny checkpoints in the real on-disk format, written once per test run."""

from __future__ import annotations

import os

# Triton's kernels (models/moe_triton.py) run on CPU tensors through its interpreter. Triton reads the flag when
# triton.language is imported (its standard library is @triton.jit code), so it is set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from tests.server.conftest import LiveServer, start_server, stop_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our writer's tiny checkpoint (fp32 on disk so that both dtypes load from the same bits)."""
    from models.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0, dtype=torch.float32)


def perturbed_reference(config, decoder_scalars: tuple[float, float], encoder_scalars: tuple[float, float]):
    """transformers' own model for `config` (seed 0), its norms and layer scalars perturbed as spec 9.2 says, so a
    wrong norm or a shared scalar buffer is caught: layer i's scalar is first + i * step of each (first, step)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
                param.add_(0.1 * torch.randn_like(param))
        for layers, (first, step) in ((model.model.decoder.layers, decoder_scalars),
                                      (model.model.encoder.language_model.layers, encoder_scalars)):  # fmt: skip
            for i, layer in enumerate(layers):
                layer.layer_scalar.fill_(first + step * i)
    return model


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny config built and saved by transformers itself, perturbed as spec 9.2 says."""
    from transformers import DiffusionGemmaConfig

    model = perturbed_reference(DiffusionGemmaConfig.from_pretrained(tiny_checkpoint), (1.1, 0.05), (0.8, -0.05))
    out = tmp_path_factory.mktemp("reference")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shared server: no API key, the tiny checkpoint."""
    live = start_server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server of the bundled demo checkpoint, whose canvases settle (the tiny random one's never do)."""
    from models.hub import DEMO_CHECKPOINT

    live = start_server(DEMO_CHECKPOINT, tmp_path_factory.mktemp("demo") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()
