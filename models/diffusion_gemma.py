"""DiffusionGemma's text stack in plain PyTorch (spec 3-5).

One set of weights runs in two modes. `encode` is causal and writes the KV cache (prefill, and the commit of a
finished canvas). `denoise` runs a canvas bidirectionally over cache + canvas, with self-conditioning, and never
writes the cache. Module and parameter names equal the checkpoint keys under `model.decoder.`; the encoder's own
`layer_scalar` buffers are held as `encoder_layer_scalar`.

Numerics follow the reference op for op (spec 10, P3-P8): RMSNorm in fp32, RoPE tables cast to the activation dtype,
fp32 router softmax, fp32 expert accumulation, bf16 LM-head output softcapped in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models import moe_triton
from models.attend import Attend
from models.config import LayerGeometry, ModelConfig
from models.gemm_path import ExpertPath, expert_path, torch_grouped_mm


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-1/2 * weight in fp32, cast back (spec P4: plain weight, not 1 + w)."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def gelu_mlp(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(F.gelu(gate(x), approximate="tanh") * up(x))


class MLP(nn.Module):
    """The always-on dense GELU MLP that runs beside the experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.gate_proj, self.up_proj, self.down_proj)


def inverse_frequencies(geometry: LayerGeometry) -> torch.Tensor:
    """[d/2] fp32: theta^(-2i/d) for the rotating pairs, 0 for the rest (spec 1.3: 'proportional' uses the full d)."""
    d = geometry.head_dim
    num_rotating = int(geometry.rope_fraction * d // 2)
    exponents = torch.arange(0, 2 * num_rotating, 2, dtype=torch.float) / d
    rotating = 1.0 / (geometry.rope_theta**exponents)
    return torch.cat([rotating, torch.zeros(d // 2 - num_rotating)])


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [B, S, 1, d] for positions [B, S]; angles in fp32, then cast to the activation dtype (spec 1.3)."""
    angles = positions[..., None].float() * inv_freq.float()
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half: dimension j pairs with j + d/2. x is [B, S, heads, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Q/K/V norms, attention scale 1.0; full layers have no v_proj and take V from k_raw before k_norm (spec 3)."""

    def __init__(self, config: ModelConfig, geometry: LayerGeometry) -> None:
        super().__init__()
        h, d, kv = config.hidden_size, geometry.head_dim, geometry.num_kv_heads
        self.head_dim, self.num_kv_heads, self.eps = d, kv, config.rms_norm_eps
        self.num_groups = config.num_attention_heads // kv
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, kv * d, bias=False)
        # Full layers have no v_proj in the checkpoint; V is k_raw (spec 2.3). Without this they would need one.
        self.v_proj = nn.Linear(h, kv * d, bias=False) if geometry.is_sliding else None
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv, S, d] of normed hidden states x [B, S, H]."""
        k_raw = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B, S, kv, d]
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = rms_norm(v_raw, None, self.eps)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """x [B, S, H], already input-normed; attend(q, k, v) runs attention over the cache and these slots."""
        q = apply_rope(self.q_norm(self.q_proj(x).unflatten(-1, (-1, self.head_dim))), cos, sin).transpose(1, 2)
        out = attend(q, *self.project_kv(x, cos, sin))  # [B, heads, S, d]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Router(nn.Module):
    """Top-k routing on the un-normed residual (spec 3, step 8)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps, self.top_k = config.rms_norm_eps, config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> fp32 weights [T, K] and expert ids [T, K]."""
        r = rms_norm(x, None, self.eps) * self.scale * self.root_size  # bf16, in this order
        probs = F.softmax(self.proj(r), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


@torch.library.custom_op("dgserve::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch_grouped_mm()(x, weight, offs=offsets)


@_grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[-1])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, in] grouped by expert: rows offsets[e-1]:offsets[e] use weight[e] [out, in]; returns x @ weight[e].T.
    Rows from offsets[-1] on are not computed (their output is undefined). An opaque op to torch.compile, whose own
    grouped_mm takes bf16 only, so that fp32 compiles with the same kernel as eager."""
    return _grouped_mm(x, weight.mT, offsets)


class Experts(nn.Module):
    """Packed experts: gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I] (spec 2.3).

    The forward has static shapes and no host syncs (CUDA graphs, torch.compile fullgraph). Its GEMMs are the methods
    `_grouped_linear` and `_expert_linear`, run as `path` says (models.gemm_path: set once at load, the CPU's until
    then); models.quant.QuantExperts replaces them for quantized weights."""

    def __init__(self, config: ModelConfig, row_alignment: int = 1) -> None:
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        # CPU GEMMs round a row differently when a group has few rows (fewer than 12, not a multiple of 4), so a
        # token's output would depend on what else is routed to its expert. Padding every group to a multiple of 4
        # rows makes each token's result independent of the batch. 1 = no padding, as the reference runs.
        self.batch_alignment = row_alignment
        self.set_path(expert_path(torch.device("cpu"), torch.float32, None))

    def set_path(self, path: ExpertPath) -> None:
        self.path = path
        self.row_alignment = path.row_alignment(self.batch_alignment)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/experts [T, K] -> [T, H]: sum_k w_k * expert_k(x), summed in fp32 (grouped_mm)."""
        num_tokens, top_k = experts.shape
        pair_outputs = self._every_expert if self.path.kernel == "every_expert" else self._grouped
        y = pair_outputs(x, experts) * weights.reshape(-1, 1)  # fp32 from here on
        return y.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.path.kernel == "triton":
            return moe_triton.grouped_gemm(x, offsets, "bf16", weight, self.path.launch)  # "bf16": any float weight
        return grouped_linear(x, weight, offsets)

    def _expert_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[E, T, out]: every expert on the same rows x [T, in] (one GEMM), or expert e on x[e] for x [E, T, in]."""
        if x.dim() == 2:
            return F.linear(x, weight.flatten(0, 1)).unflatten(-1, (self.num_experts, -1)).transpose(0, 1)
        return torch.bmm(x, weight.mT)

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """[T*K, H]: expert_k(x_t) for every (token, k) pair in pair order, by grouped_mm over rows sorted by expert."""
        num_experts, top_k, align = self.num_experts, experts.shape[1], self.row_alignment
        # Pairs grouped by expert with the reference's own (unstable) sort: CPU grouped_mm rounds a row by its place
        # in the group, so another order inside a group changes the output by ~1e-7, enough over 30 layers of
        # top-8-of-128 routing for a token to pick other experts.
        sorted_experts, order = torch.sort(experts.reshape(-1))
        ids = torch.arange(num_experts, device=x.device, dtype=sorted_experts.dtype)
        group_start = torch.searchsorted(sorted_experts, ids)  # each expert's first place in the sorted order
        counts = torch.searchsorted(sorted_experts, ids, right=True) - group_start
        padded = (counts + align - 1) // align * align
        offsets = torch.cumsum(padded, dim=0, dtype=torch.int32)
        # A pair's row: its sorted place, moved past the padding of the groups before its own; then in pair order.
        sorted_row = torch.arange(order.numel(), device=x.device) + (offsets - padded - group_start)[sorted_experts]
        row = torch.empty_like(sorted_row).index_copy_(0, order, sorted_row)
        # Padding adds at most align-1 rows per group, so a fixed T*K + E*(align-1) rows always fit (static shape).
        rows = x.new_zeros(order.numel() + num_experts * (align - 1), x.shape[-1])
        rows.index_copy_(0, row, x.repeat_interleave(top_k, dim=0))
        gate, up = self._grouped_linear(rows, self.gate_up_proj, offsets).chunk(2, dim=-1)
        hidden = F.gelu(gate, approximate="tanh") * up
        return self._grouped_linear(hidden, self.down_proj, offsets).index_select(0, row)

    def _every_expert(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """[T*K, H] like _grouped, where there is no grouped GEMM (models.gemm_path): every expert runs on every token
        (one GEMM, one batched GEMM) and each pair takes its (expert, token) row.

        This is the per-expert layout with a static capacity of T rows, without the scatter. No smaller capacity is
        safe (any T tokens may pick one expert), and a token routed twice to an expert reads the same row, where
        scattered pairs would need T*K. It costs E/K times the useful FLOPs (16x for top-8 of 128) and [E, T, 2I] +
        [E, T, H] of workspace, but reads each weight once, as grouped_mm does, so it stays near the weight-bound
        cost while T is below the GPU's FLOPs per byte (about 150 tokens on an A100). Tiles of one expert each
        instead would copy a weight per tile."""
        num_tokens = x.shape[0]
        gate, up = self._expert_linear(x, self.gate_up_proj).chunk(2, dim=-1)  # [E, T, I]
        y = self._expert_linear(F.gelu(gate, approximate="tanh") * up, self.down_proj)  # [E, T, H]
        cell = experts * num_tokens + torch.arange(num_tokens, device=x.device)[:, None]
        return y.flatten(0, 1).index_select(0, cell.reshape(-1))


class Layer(nn.Module):
    """One transformer layer: attention, then the dense MLP and the experts in parallel (spec 3)."""

    def __init__(self, config: ModelConfig, geometry: LayerGeometry, expert_row_alignment: int = 1) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, geometry)
        self.mlp = MLP(h, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config, expert_row_alignment)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # Buffers are not tied between the two modes: each has its own scalar (spec 2.2).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: Callable, scalar: torch.Tensor
    ) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; `scalar` is the encoder's or the decoder's layer_scalar."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), *rope, attend))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts).view_as(x)
        x = x + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return x * scalar  # scales the whole residual stream


class SelfConditioning(nn.Module):
    """Decoder-only MLP that mixes the previous step's soft embedding into the canvas embedding (spec 5.2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor) -> torch.Tensor:
        sc = gelu_mlp(self.pre_norm(soft_embeds), self.gate_proj, self.up_proj, self.down_proj)
        return rms_norm(embeds + sc, None, self.eps)  # post_norm has no weight


class DiffusionGemma(nn.Module):
    """The shared text stack with its two passes; see the module docstring."""

    def __init__(self, config: ModelConfig, expert_row_alignment: int = 1) -> None:
        """expert_row_alignment 4 makes every token's result independent of the batch on CPU (see Experts)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, g, expert_row_alignment) for g in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.register_buffer("embed_scale", torch.empty(()), persistent=False)
        self.register_buffer("sliding_inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("full_inv_freq", torch.empty(0), persistent=False)
        self.init_constants()

    def init_constants(self) -> None:
        """(Re)compute the non-persistent fp32 buffers, e.g. after the loader's to_empty()."""
        device = self.embed_scale.device
        # sqrt(H) in fp32, cast to the weight dtype where used: 53.0 in bf16 (spec P5).
        self.embed_scale = torch.tensor(self.config.hidden_size**0.5, device=device)
        inv_freqs = {g.is_sliding: inverse_frequencies(g).to(device) for g in self.config.layers}
        self.sliding_inv_freq = inv_freqs.get(True, torch.zeros(0, device=device))
        self.full_inv_freq = inv_freqs[False]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings of ids: the input of both passes, and a known canvas id's SC input (a one-hot soft
        embedding)."""
        return self.embed_tokens(ids) * self.embed_scale.to(self.embed_tokens.weight.dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE tables keyed by is_sliding, computed once per pass."""
        return {
            True: rope_tables(self.sliding_inv_freq, positions, dtype),
            False: rope_tables(self.full_inv_freq, positions, dtype),
        }

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> None:
        """Causal pass over new tokens [B, S] at positions [B, S]; `attend` stores their K/V in the cache.

        The hidden states are discarded in generation, so the final norm and everything in the last layer but its
        K/V projection are skipped (spec 4.1).
        """
        x = self.embed(input_ids)
        rope = self._rope(positions, x.dtype)
        *layers, last = self.layers
        for i, layer in enumerate(layers):
            x = layer(x, rope[self.config.layers[i].is_sliding], partial(attend, i), layer.encoder_layer_scalar)
        cos, sin = rope[self.config.layers[-1].is_sliding]
        attend(len(layers), None, *last.self_attn.project_kv(last.input_layernorm(x), cos, sin))

    @torch.no_grad()  # not inference_mode, which torch.compile cannot trace (engine/graphs.py compiles this)
    def denoise(
        self,
        canvas: torch.Tensor,  # [B, C] token ids
        positions: torch.Tensor,  # [B, C]
        attend: Attend,
        soft_embeds: torch.Tensor | None,  # [B, C, H] from sc_embedding(), None on a canvas' first step
    ) -> torch.Tensor:
        """Bidirectional pass of a canvas over cache + canvas; returns final-normed hidden states [B, C, H].

        `attend` reads the cache and never writes it: the canvas is not part of the prefix until committed by encode.
        """
        e = self.embed(canvas)
        # A zero soft embedding gives an exactly zero SC signal, so the first step skips the SC MLP.
        x = (
            rms_norm(e, None, self.config.rms_norm_eps)
            if soft_embeds is None
            else self.self_conditioning(e, soft_embeds)
        )
        rope = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope[self.config.layers[i].is_sliding], partial(attend, i), layer.layer_scalar)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """fp32 softcapped logits [..., end - start] of vocabulary ids [start, end) for final-normed hidden rows.

        The LM head is the tied embedding; bf16 rounding happens before the fp32 softcap (spec P6).
        """
        cap = self.config.final_logit_softcapping
        z = F.linear(hidden, self.embed_tokens.weight[start:end]).float()
        return z.div_(cap).tanh_().mul_(cap)  # in place: the same values as out of place

    def shifted_logits(
        self, hidden: torch.Tensor, start: int, end: int, scale: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """(softcap(z) + cap) * scale written into the fp32 buffer `out` [N, end - start], for hidden [N, H] and a
        per-row scale [N, 1] (the sampler's 1 / temperature).

        The per-row shift changes no softmax, entropy or argmax, and it turns cap * tanh(z / cap) + cap into
        2 * cap * sigmoid(2 * z / cap): on CPU sigmoid is about 8x cheaper than tanh, the sampler's costliest
        elementwise op. All values are >= 0.
        """
        cap = self.config.final_logit_softcapping
        weight = self.embed_tokens.weight[start:end]
        if weight.dtype == torch.float32:
            torch.addmm(out, hidden, weight.t(), beta=0, alpha=2 / cap, out=out)  # the 2 / cap rides in the GEMM
        else:
            out.copy_(F.linear(hidden, weight)).mul_(2 / cap)  # bf16 rounding first, as in logits()
        return out.sigmoid_().mul_(2 * cap * scale)

    @torch.inference_mode()
    def sc_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """Soft embedding softmax_fp32(z) -> model dtype -> @ E -> * embed scale, for logits [..., V] (spec P3)."""
        weight = self.embed_tokens.weight
        probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(weight.dtype)
        return torch.matmul(probs, weight) * self.embed_scale.to(weight.dtype)
