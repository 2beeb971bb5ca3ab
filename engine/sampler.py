"""One entropy-bound denoising step (spec 6.2): proposals, acceptance, renoising, stopping signals, SC input.

`fast_step` streams over vocabulary chunks and never holds a [rows, C, V] tensor: softcap, temperature, argmax,
entropy, proposals and the self-conditioning soft embedding come out of one online-softmax pass. Workspace per row
is two [C, vocab_chunk] fp32 buffers (three with scaled proposals; 4 MiB each at C = 256 and the CPU chunk of 2048)
plus [C, H] accumulators, whatever V is. It has no per-row Python work and no op that syncs with the host or sizes
its output from data, so one graph serves every batch: it compiles with fullgraph and can be captured by CUDA graphs.

Proposals are exact draws from softmax(zt / f), drawn hierarchically without data-dependent shapes:
* Each chunk is split into blocks of at most 64 ids. Inside the loop, every chunk draws a candidate by inverse CDF
  over its block masses (a block) and then over that block's values (a token): two searchsorted calls on
  [N, chunk / block] and [N, block] cumulative sums, on values the softmax pass already has in memory.
* After the loop one chunk is picked per position by inverse CDF over the chunk masses, rescaled to the final
  running max, and its candidate is the proposal: P(v) = P(chunk) P(v | chunk) = (w_c / W) (e_v / w_c) = e_v / W.
Only the picked chunk's candidate is used, so every chunk's candidate may reuse the same two uniforms, which are
independent of the chunk's: three counter-based uniforms per position and step (engine/noise.py), whatever V.
The alternatives cost more on CPU, where this pass bounds the step: a Gumbel-max/exponential race needs V hashed
uniforms per position (67 M per row-step at V = 262,144) and a reservoir over chunks a full-chunk cumsum per chunk
(one more pass over V, 14x a sum on CPU); the block sums above replace the sum the entropy needs anyway, at about
1.5x its cost. The argmax likewise reduces block maxima and then the winning block: an index reduction over a whole
chunk costs 10x a max reduction on CPU, and the old CPU trick (index only the rows a chunk improved) needs nonzero.
Per chunk that is two GEMMs (LM head, SC), eight passes over the chunk and ~30 ops on [N, chunk / 64] or smaller
tensors.

Tokens are a function of (logits, key, vocab_chunk): a seeded request gets the same tokens alone and in any batch
wherever the forward is batch-invariant (CPU). Rows never read each other's noise, on any device.

`token_logprobs` scores committed tokens after the step that committed them, for the rows that ask only: outside
the compiled step, so that rows without logprobs pay nothing (README "Logprobs").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.noise import PROPOSAL, RENOISE, random_ids, uniform
from models.diffusion_gemma import DiffusionGemma


@dataclass(slots=True)
class StepResult:
    """A denoising step's outcome for R rows."""

    canvas: torch.Tensor  # [R, C] next input: accepted proposals, the rest renoised
    argmax: torch.Tensor  # [R, C] the greedy canvas, committed when the canvas stops
    entropy: torch.Tensor  # [R, C] fp32 per position, 0 where pinned
    mean_entropy: torch.Tensor  # [R] fp32 over the positions not pinned, for the confidence test
    soft_embeds: torch.Tensor  # [R, C, H] the next step's self-conditioning input


def unpinned_entropy(entropy: torch.Tensor, pinned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies [R, C] with pinned positions at 0 (known exactly: they take no share of the entropy bound), and
    their mean over the positions not pinned. Without pins, the same bits as entropy and entropy.mean(-1)."""
    entropy = entropy.masked_fill(pinned, 0)
    free = (~pinned).sum(-1).clamp_(min=1)
    return entropy, entropy.sum(-1) / free


def accept_mask(entropy: torch.Tensor, entropy_bound: torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions while the sorted cumulative entropy, minus its latest term, <= bound."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound[:, None]
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


@torch.no_grad()  # not inference_mode: compiling an inference_mode function fails outside inference mode
def fast_step(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [R, C, H] final-normed decoder output
    inputs: dict[str, torch.Tensor],  # the step's per-row inputs (engine/request.py STEP_INPUTS)
    noise_key: torch.Tensor,  # [R] int64, noise.step_key(seed, canvas index, step)
    pinned: torch.Tensor,  # [R, C] bool: positions whose input stays fixed
    vocab_chunk: int,
    scaled_proposals: bool,  # some temperature factor is not 0 or 1: proposals need their own exp pass
) -> StepResult:
    """Proposals at the schedule temperature times the row's `temperature` factor (0 proposes the argmax)."""
    factor, entropy_bound = inputs["temperature"], inputs["entropy_bound"]  # factor: the request's temperature
    weight = model.embed_tokens.weight  # [V, H]
    vocab = weight.shape[0]
    rows, length, width = hidden.shape
    n = rows * length  # every (row, position) is one softmax
    flat = hidden.reshape(n, width)

    def per_position(x: torch.Tensor) -> torch.Tensor:  # [R] -> [N, 1]
        return x[:, None].expand(rows, length).contiguous().view(n, 1)  # a copy for any R: the same ops

    inv_t = per_position(1 / inputs["schedule_temperature"])
    # A factor-0 row samples at factor 1, which keeps it finite; its proposal is the argmax.
    inv_f = per_position(1 / torch.where(factor == 0, 1, factor))
    u_chunk, u_block, u_token = uniform(noise_key, PROPOSAL, (length, 3)).view(n, 3).split(1, -1)
    position = torch.arange(n, device=hidden.device)[:, None]  # [N, 1]
    # Per position [N, 1]. zt below is the shifted zt = (softcap(z) + cap) / T >= 0: the same softmax, entropy and
    # argmax as softcap(z) / T.
    running_max = torch.zeros(n, 1, device=hidden.device)  # 0 bounds every shifted max from below
    sum_exp = torch.zeros_like(running_max)
    sum_exp_d = torch.zeros_like(running_max)  # sum of exp(zt - max) * (zt - max): near 0 for precision
    best_id = torch.zeros(n, 1, dtype=torch.long, device=hidden.device)  # where running_max was first reached
    soft = torch.zeros(n, width, device=hidden.device)  # sum of exp(zt - max) * E[v]
    candidates, masses, maxima = [], [], []  # per chunk: its draw, its proposal mass, the max that mass is scaled by
    # The workspaces are reused for every chunk: fresh vocab-sized allocations cost page faults and memory.
    workspace = torch.empty(3 if scaled_proposals else 2, n * min(vocab_chunk, vocab), device=hidden.device)
    for start in range(0, vocab, vocab_chunk):
        size = min(vocab_chunk, vocab - start)
        block = next(b for b in range(min(_BLOCK, size), 0, -1) if size % b == 0)
        zt, e, *scaled = (buffer[: n * size].view(n, size) for buffer in workspace)
        first_block = position * (size // block)  # of each row in buffer.view(-1, block)
        model.shifted_logits(flat, start, start + size, inv_t, out=zt)  # [N, Vc] fp32
        chunk_best, best_block = zt.view(n, -1, block).amax(-1).max(-1, keepdim=True)  # the first block on ties
        chunk_best_id = _block_of(zt, first_block + best_block, block).argmax(-1, keepdim=True)
        better = chunk_best > running_max  # strict: ties keep the earlier chunk, as argmax keeps the first index
        best_id = torch.where(better, chunk_best_id.add_(best_block, alpha=block).add_(start), best_id)
        new_max = torch.maximum(running_max, chunk_best)
        shift = running_max - new_max
        rescale = torch.exp(shift)
        # Moving the max from m to m' turns sum e (zt - m) into rescale * (sum e (zt - m) + (m - m') sum e).
        sum_exp_d = rescale * (sum_exp_d + shift * sum_exp)
        d = zt.sub_(new_max)
        torch.exp(d, out=e)
        block_cdf = e.view(n, -1, block).sum(-1).cumsum(-1)
        if scaled_proposals:  # exp((zt - m) / f): at f = 1 the same bits as e, so such rows match the other branch
            p = torch.mul(d, inv_f, out=scaled[0]).exp_()
            p_cdf = p.view(n, -1, block).sum(-1).cumsum(-1)
        else:
            p, p_cdf = e, block_cdf
        # A candidate per chunk from p: a block by its mass, then a token of that block (chunk-local ids).
        picked = _search(p_cdf, u_block)
        in_block = _search(_block_of(p, first_block + picked, block).cumsum(-1), u_token)
        candidates.append(in_block.add_(picked, alpha=block))
        masses.append(p_cdf[:, -1:])
        maxima.append(new_max)
        sum_exp = sum_exp * rescale + block_cdf[:, -1:]
        sum_exp_d += d.mul_(e).sum(-1, keepdim=True)  # in place: d is spent
        _accumulate_soft(soft.mul_(rescale), e, weight[start : start + size])
        running_max = new_max
    entropy = (torch.log(sum_exp) - sum_exp_d / sum_exp).view(rows, length)  # -sum p log p with p = softmax(zt)
    entropy, mean_entropy = unpinned_entropy(entropy, pinned)
    best_id = best_id.view(rows, length)
    accept = accept_mask(entropy, entropy_bound)

    # Chunk masses under the final max: each was scaled by exp(-max / f) with the max as its chunk left it.
    chunk_cdf = torch.cumsum(torch.cat(masses, -1) * torch.exp((torch.cat(maxima, -1) - running_max) * inv_f), -1)
    chunk = _search(chunk_cdf, u_chunk)
    sampled = torch.cat(candidates, -1).gather(1, chunk) + chunk * vocab_chunk
    proposal = torch.where((factor == 0)[:, None], best_id, sampled.view(rows, length))
    renoise = random_ids(noise_key, RENOISE, length, vocab)
    next_canvas = torch.where(accept, proposal, renoise)
    soft_embeds = (soft / sum_exp).view(rows, length, width).to(weight.dtype)
    soft_embeds = soft_embeds * model.embed_scale.to(weight.dtype)
    return StepResult(next_canvas, best_id, entropy, mean_entropy, soft_embeds)


@torch.inference_mode()
def token_logprobs(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [M, H] final-normed decoder output at the committed positions
    tokens: torch.Tensor,  # [M] int64, the token committed at each
    k: int,
    vocab_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax of the raw model distribution (softcapped logits, temperature 1) at each row: [M] the logprob of
    `tokens`, and [M, k] the k largest logprobs, best first, with [M, k] their ids.

    One pass over vocabulary chunks, nothing [M, V]: the logits are softcapped into [-cap, cap], so the log-sum-exp
    needs no running max (exp(z - cap) >= exp(-2 cap) stays normal in fp32), and the top-k is a running merge.
    """
    cap = model.config.final_logit_softcapping
    vocab = model.embed_tokens.weight.shape[0]
    sum_exp = torch.zeros(tokens.shape[0], 1, device=hidden.device)
    chosen = torch.zeros_like(sum_exp)
    best = None
    for start in range(0, vocab, vocab_chunk):
        z = model.logits(hidden, start, min(start + vocab_chunk, vocab))  # [M, Vc] fp32 in [-cap, cap]
        local = (tokens - start)[:, None]
        inside = (local >= 0) & (local < z.shape[1])
        chosen = torch.where(inside, z.gather(1, local.clamp(0, z.shape[1] - 1)), chosen)
        if k:
            values, ids = torch.topk(z, min(k, z.shape[1]), dim=-1)
            best = merge_top_k(best, values, ids.add_(start), k)
        sum_exp += torch.exp(z - cap).sum(-1, keepdim=True)
    lse = torch.log(sum_exp) + cap
    if best is None:  # k = 0: [M, 0]
        best = (sum_exp[:, :0], tokens[:, None][:, :0])
    return (chosen - lse)[:, 0], best[0] - lse, best[1]


def merge_top_k(
    best: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of a running top-k `best` and a chunk's top-k (values [M, k'], global ids [M, k']), best first."""
    if best is None:
        return values, ids
    values, picked = torch.topk(torch.cat([best[0], values], -1), min(k, best[0].shape[1] + values.shape[1]), dim=-1)
    return values, torch.cat([best[1], ids], -1).gather(-1, picked)


_BLOCK = 64  # the most ids per block of a chunk: the two draws inside a chunk search chunk / 64 and 64 values


def _block_of(x: torch.Tensor, flat_block: torch.Tensor, block: int) -> torch.Tensor:
    """[N, block] rows flat_block [N, 1] of x.view(-1, block): index_select, 5x faster than gather on CPU."""
    return x.view(-1, block).index_select(0, flat_block.view(-1))


def _search(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, 1] inverse CDF index for uniforms u [N, 1] over unnormalised cumulative sums cdf [N, K].

    right=True never picks a zero-mass entry; the clamp gives the last entry u * total == total (a rounding case).
    """
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)


def _accumulate_soft(soft: torch.Tensor, e: torch.Tensor, weight: torch.Tensor) -> None:
    """soft [N, H] fp32 += e [N, Vc] @ weight [Vc, H].

    Off CPU with bf16 (or fp16) weights: a tensor-core GEMM of e rounded to the weight dtype with fp32 accumulation
    and output, as the reference's bf16 SC GEMM (spec P3) without copying the chunk of E to fp32. On CPU fp32 math.
    """
    if weight.dtype == torch.float32 or weight.device.type == "cpu":
        soft.addmm_(e, weight.float())
    else:
        soft.add_(torch.mm(e.to(weight.dtype), weight, out_dtype=torch.float32))
