"""Engine settings, fixed at start."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine runs a checkpoint; validated once at construction."""

    checkpoint: str
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # "bfloat16" | "float32"; None: bf16 on CUDA, fp32 on CPU (bf16 matmuls crawl on CPU)
    quantization: str | None = None  # "fp8" | "nvfp4": quantize a bf16 checkpoint's weights at load (models.quant)
    # Run the kernels a GPU of this class would (models.gemm_path, e.g. "sm89"): for analysis (benchmarks/step_ops.py)
    # and the Triton kernels' CPU tests; None: the device's own.
    device_class: str | None = None
    max_num_seqs: int = 8  # sequences denoising at once
    max_model_len: int | None = None  # prompt + max_tokens limit; None: the checkpoint's max_position_embeddings
    kv_budget_bytes: int | None = None  # KV memory for all sequences; None: kv_budget_fraction of what remains
    # Share of the memory left after loading, the activation peak and the CUDA graphs that the KV pool takes; the
    # rest is the margin for the allocator's fragmentation and the CUDA context (engine/memory.py).
    kv_budget_fraction: float = 0.9
    max_waiting: int = 256  # requests queued beyond the free slots; more are refused (the server's 429)
    # Tokens of a prompt (or canvas commit) a sequence encodes per iteration: bounds a long prompt's attention memory
    # ([heads, chunk, prefix] scores instead of [heads, prompt, prompt]), and others keep denoising meanwhile.
    # Reference mode encodes a prompt in one pass, as generate() does.
    prefill_chunk: int = 2048
    # Encoder tokens of one iteration, in whole chunks: what the start-up profile measures, so that its activation
    # peak bounds every iteration whatever prompts arrive.
    max_num_batched_tokens: int = 8192
    vocab_chunk: int | None = None  # sampler workspace per row: [canvas, vocab_chunk] fp32; None: 2048 CPU, 8192 CUDA
    reference_mode: bool = False  # reproduce transformers' generate() draw for draw: one sequence, global RNG
    # torch.compile the denoising step (fullgraph; engine/graphs.py). None: on CUDA, not on CPU, where compiling
    # takes minutes on a few cores; never in reference mode.
    compile: bool | None = None
    cuda_graphs: bool = True  # capture the compiled step as one CUDA graph per bucket at start (CUDA only)
    max_capture_len: int = 8192  # captured page-table widths cover contexts up to this many tokens
    # Share prompt pages between requests by content (engine/prefix_cache.py). Off in reference mode, which encodes
    # every prompt whole as generate() does.
    enable_prefix_caching: bool = True
    # Share of the KV budget left after the sliding-window rings that stores the sliding layers' KV of cached pages
    # (a hit needs the last W - 1 tokens of it); the full-layer pages are cached in whatever the pool has free.
    prefix_cache_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.reference_mode and self.max_num_seqs != 1:
            raise ValueError("reference_mode runs one sequence at a time: set max_num_seqs=1")
        if not 0 < self.kv_budget_fraction <= 1:
            raise ValueError(f"kv_budget_fraction must be in (0, 1], got {self.kv_budget_fraction}")
        if (self.vocab_chunk is not None and self.vocab_chunk < 1) or self.max_waiting < 0 or self.prefill_chunk < 1:
            raise ValueError("vocab_chunk and prefill_chunk must be >= 1 and max_waiting >= 0")
        if self.reference_mode and self.compile:
            raise ValueError("reference_mode runs eager: it cannot be compiled")
        if self.max_num_batched_tokens < self.prefill_chunk:
            raise ValueError(f"max_num_batched_tokens must be >= prefill_chunk ({self.prefill_chunk})")
        if self.max_capture_len < 1:
            raise ValueError(f"max_capture_len must be >= 1, got {self.max_capture_len}")
        if not 0 < self.prefix_cache_fraction < 1:
            raise ValueError(f"prefix_cache_fraction must be in (0, 1), got {self.prefix_cache_fraction}")
        if self.dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def compiled(self) -> bool:
        if self.compile is None:
            return self.torch_device.type == "cuda" and not self.reference_mode
        return self.compile

    @property
    def prefix_caching(self) -> bool:
        return self.enable_prefix_caching and not self.reference_mode

    @property
    def batch_alignment(self) -> int:
        """Rows that encoder batches and expert groups are padded to a multiple of. CPU GEMMs round a row
        differently when they see fewer than 12 rows that are not a multiple of 4, so on the CPU padding to 4 keeps
        a sequence's numbers independent of its batch. GPU kernels are not batch-invariant whatever the padding, and
        reference mode runs the reference's exact shapes: 1."""
        return 4 if self.torch_device.type == "cpu" and not self.reference_mode else 1

    @property
    def encoder_key_block(self) -> int:
        """The encoder lays its keys out in blocks of this many positions (engine/attention.py): the CPU flash
        kernel's KV block, which with batch_alignment keeps a token's bits independent of its chunk. 1 elsewhere."""
        return 512 if self.batch_alignment > 1 else 1

    @property
    def sampler_chunk(self) -> int:
        """Vocabulary chunk of the streaming sampler: cache-sized on CPU, launch-amortising on GPUs (measured)."""
        return self.vocab_chunk or (8192 if self.torch_device.type == "cuda" else 2048)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
