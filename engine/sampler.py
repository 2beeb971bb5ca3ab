"""One entropy-bound denoising step (spec 6.2): proposals, acceptance, renoising, stopping signals, SC input.

`fast_step` streams over vocabulary chunks and never holds a [rows, C, V] tensor: softcap, temperature, argmax,
entropy and the self-conditioning soft embedding come out of one online-softmax pass. Workspace per row is two
[C, vocab_chunk] fp32 buffers (4 MiB at C = 256 and the CPU chunk of 2048; 16 MiB at 8192) plus [C, H]
accumulators, whatever V is. Per chunk that is two GEMMs (LM head, SC) and eight elementwise or row passes.
Proposals are drawn hierarchically (a vocabulary chunk by its mass, then a token inside it), which is an exact draw
from softmax at one uniform per position plus one small multinomial, instead of V Exp(1) draws per position.
Every draw comes from the row's own generator, so a seeded request samples the same tokens in any batch.

`reference_step` repeats transformers' generate() op for op on the global generator (spec 6.3), for one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.diffusion_gemma import DiffusionGemma


@dataclass(slots=True)
class StepResult:
    """A denoising step's outcome for R rows."""

    canvas: torch.Tensor  # [R, C] next input: accepted proposals, the rest renoised
    argmax: torch.Tensor  # [R, C] the greedy canvas, committed when the canvas stops
    mean_entropy: torch.Tensor  # [R] fp32, for the confidence test
    soft_embeds: torch.Tensor  # [R, C, H] the next step's self-conditioning input


def schedule_temperature(steps_left: int, t_min: float, t_max: float, max_steps: int) -> torch.Tensor:
    """T = t_min + (t_max - t_min) * n / N with n the steps remaining, as fp32 tensor arithmetic (spec 6.2)."""
    n = torch.tensor(steps_left, dtype=torch.int32)
    return t_min + (t_max - t_min) * (n / max_steps)


def accept_mask(entropy: torch.Tensor, entropy_bound: torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions while the sorted cumulative entropy, minus its latest term, <= bound."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound[:, None]
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


@torch.inference_mode()
def fast_step(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [R, C, H] final-normed decoder output
    canvas: torch.Tensor,  # [R, C] this step's input canvas
    temperature: torch.Tensor,  # [R] fp32 schedule temperature
    proposal_factor: list[float],  # per row: 1 = sample at the schedule temperature, 0 = argmax
    entropy_bound: torch.Tensor,  # [R]
    generators: list[torch.Generator],
    vocab_chunk: int,
) -> StepResult:
    weight = model.embed_tokens.weight  # [V, H]
    vocab = weight.shape[0]
    rows, length, width = hidden.shape
    n = rows * length  # every (row, position) is one softmax
    flat = hidden.reshape(n, width)
    inv_t = 1 / temperature.to(hidden.device).repeat_interleave(length)[:, None]  # [N, 1]
    # zt below is the shifted zt = (softcap(z) + cap) / T >= 0: the same softmax, entropy and argmax as softcap(z) / T.
    running_max = torch.zeros(n, device=hidden.device)  # 0 bounds every shifted max from below
    sum_exp = torch.zeros(n, device=hidden.device)
    sum_exp_d = torch.zeros_like(sum_exp)  # sum of exp(zt - max) * (zt - max): the entropy's mean, near 0 for precision
    best_id = torch.zeros(n, dtype=torch.long, device=hidden.device)  # where running_max was first reached
    soft = torch.zeros(n, width, device=hidden.device)  # sum of exp(zt - max) * E[v]
    chunk_mass = []  # [N] log-mass of each chunk under the proposal distribution
    # The two workspaces are reused for every chunk: fresh vocab-sized allocations cost page faults and memory.
    workspace = torch.empty(2, n * min(vocab_chunk, vocab), device=hidden.device)
    for start in range(0, vocab, vocab_chunk):
        size = min(vocab_chunk, vocab - start)
        zt, e = (buffer[: n * size].view(n, size) for buffer in workspace)
        model.shifted_logits(flat, start, start + size, inv_t, out=zt)  # [N, Vc] fp32
        chunk_best = zt.amax(dim=-1)
        better = chunk_best > running_max  # strict: ties keep the earlier chunk, as argmax keeps the first index
        if zt.is_cuda:  # no host sync per chunk
            best_id = torch.where(better, zt.argmax(dim=-1) + start, best_id)
        else:  # CPU index reductions cost 10x amax: index only the rows this chunk improved (few after the first)
            improved = better.nonzero().squeeze(-1)
            best_id[improved] = zt[improved].argmax(dim=-1) + start
        new_max = torch.maximum(running_max, chunk_best)
        rescale = torch.exp(running_max - new_max)
        # Moving the max from m to m' turns sum e (zt - m) into rescale * (sum e (zt - m) + (m - m') sum e).
        sum_exp_d = rescale * (sum_exp_d + (running_max - new_max) * sum_exp)
        d = zt.sub_(new_max[:, None])
        torch.exp(d, out=e)
        chunk_sum = e.sum(-1)
        chunk_mass.append(_proposal_chunk_mass(d.view(rows, length, size), new_max, chunk_sum, proposal_factor))
        sum_exp = sum_exp * rescale + chunk_sum
        sum_exp_d += d.mul_(e).sum(-1)  # in place: d is spent
        soft.mul_(rescale[:, None]).addmm_(e, weight[start : start + size].float())
        running_max = new_max
    entropy = (torch.log(sum_exp) - sum_exp_d / sum_exp).view(rows, length)  # -sum p log p with p = softmax(zt)
    best_id = best_id.view(rows, length)
    accept = accept_mask(entropy, entropy_bound.to(hidden.device))
    chunk_mass = torch.stack(chunk_mass, dim=-1).view(rows, length, -1)  # [R, C, num_chunks]

    # Acceptance depends on the entropies alone, so only accepted positions need a proposal; the rest is renoised.
    next_canvas = torch.empty_like(canvas)
    for r, gen in enumerate(generators):
        accepted = accept[r].nonzero().squeeze(-1)
        if proposal_factor[r] == 0:
            proposal = best_id[r, accepted]
        else:
            temperature_r = temperature[r] * proposal_factor[r]
            proposal = _draw(model, hidden[r, accepted], chunk_mass[r, accepted], temperature_r, gen, vocab_chunk)
        noise = torch.randint(0, vocab, (length,), generator=gen, device=gen.device).to(canvas.device)
        next_canvas[r] = noise.index_put_((accepted,), proposal)
    soft_embeds = (soft / sum_exp[:, None]).view(rows, length, width).to(weight.dtype)
    soft_embeds = soft_embeds * model.embed_scale.to(weight.dtype)
    return StepResult(next_canvas, best_id, entropy.mean(-1), soft_embeds)


def _proposal_chunk_mass(
    d: torch.Tensor, row_max: torch.Tensor, chunk_sum: torch.Tensor, proposal_factor: list[float]
) -> torch.Tensor:
    """[N] log sum over the chunk of exp(zt / factor), from d = zt - row_max [R, C, Vc]: at factor 1 it falls out of
    the softmax pass."""
    mass = row_max + torch.log(chunk_sum)
    length = d.shape[1]
    for r, factor in enumerate(proposal_factor):
        if factor not in (0.0, 1.0):
            rows = slice(r * length, (r + 1) * length)
            mass[rows] = row_max[rows] / factor + torch.logsumexp(d[r] / factor, dim=-1)
    return mass


def _draw(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [P, H] positions of one row
    chunk_mass: torch.Tensor,  # [P, num_chunks]
    temperature: torch.Tensor,  # scalar: the proposal temperature
    gen: torch.Generator,
    vocab_chunk: int,
) -> torch.Tensor:
    """An exact sample per position from softmax(z / temperature): a chunk by its mass, then a token within it."""
    length = hidden.shape[0]
    u = torch.rand(length, 1, generator=gen, device=gen.device).to(chunk_mass.device)
    cdf = torch.cumsum(torch.softmax(chunk_mass, dim=-1), dim=-1)
    chunk = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)  # [C]
    tokens = torch.empty(length, dtype=torch.long, device=hidden.device)
    for c in torch.unique(chunk).tolist():  # ascending, so the draw order is fixed
        rows = (chunk == c).nonzero().squeeze(-1)
        start = c * vocab_chunk
        z = model.logits(hidden[rows], start, start + vocab_chunk) / temperature
        probs = torch.softmax(z, dim=-1)
        picked = torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(-1).to(hidden.device)
        tokens[rows] = picked + start
    return tokens


@torch.inference_mode()
def reference_step(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [1, C, H]
    canvas: torch.Tensor,  # [1, C]
    temperature: torch.Tensor,  # fp32 scalar
    entropy_bound: float,
) -> StepResult:
    """generate()'s step with the global generator: multinomial over [C, V], then a renoise randint (spec 6.3).

    The temperature-scaled logits, cast to the model dtype, are the next step's SC input (spec P3).
    """
    zt = model.logits(hidden) / temperature  # [1, C, V] fp32, materialised as the reference does
    vocab = zt.shape[-1]
    probs = torch.softmax(zt, dim=-1, dtype=torch.float32)
    proposal = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(canvas.shape)
    argmax = torch.argmax(zt, dim=-1)
    entropy = torch.distributions.Categorical(logits=zt).entropy()
    accept = accept_mask(entropy, torch.tensor([entropy_bound], device=entropy.device))
    accepted = torch.where(accept, proposal, canvas)
    noise = torch.randint(0, vocab, canvas.shape, device=canvas.device)
    next_canvas = torch.where(~accept, noise, accepted)
    sc_logits = zt.to(model.embed_tokens.weight.dtype)
    return StepResult(next_canvas, argmax, entropy.mean(-1), model.sc_embedding(sc_logits))


def initial_canvas(length: int, vocab: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A canvas of uniform random ids over the whole vocabulary, specials included (spec P14)."""
    if gen is None:  # reference mode: the global generator, shape [1, C] as generate() draws it
        return torch.randint(0, vocab, (1, length), device=device)[0]
    return torch.randint(0, vocab, (length,), generator=gen, device=gen.device).to(device)
