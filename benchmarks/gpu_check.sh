#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and torch, transformers and safetensors installed (no network, no
# checkpoint), in under 9 minutes. Parity on the device, then ms per denoising step of the real model's shapes with
# random bf16 weights: ours eager, compiled and with CUDA graphs at B = 1, 4, 16 and 1K / 4K context, the
# transformers reference step, peak memory, each against the spec 8.3 floor. Then a 30-second stress run: 16
# concurrent 8K-token prompts at the largest batch the profiled memory budget allows, which fails (exit 1) if any
# request fails, printing the profiled memory split against torch.cuda.max_memory_allocated.
#
#     bash benchmarks/gpu_check.sh [extra benchmarks.gpu_bench options for the step benchmark]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# The engine and the benchmark import torch, transformers (with its tokenizers and tqdm) and safetensors only.
python -c "import torch, transformers, safetensors" || { echo "needs torch, transformers and safetensors" >&2; exit 1; }
python -m benchmarks.gpu_bench "$@"
exec python -m benchmarks.gpu_bench --skip-parity --modes stress --quantizations --stress-prompt 8192 --stress-seconds 30
