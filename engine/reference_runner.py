"""Reference mode: transformers' generate() reproduced draw for draw, one sequence at a time (spec 6.3, 9.4).

A ModelRunner whose step runs as the reference runs it: each layer attends over exactly the sequence's keys in the
reference's order with SDPA called as the reference calls it, the sampler materialises [C, V] and draws from the
global generator (seeded when the sequence is admitted), and the schedule temperature is the reference's fp32 tensor
arithmetic. The engine chooses it at construction (EngineConfig.reference_mode) with the scheduler settings that go
with it: whole prompts, one sequence, no batch alignment.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVPool
from engine.model_runner import ModelRunner
from engine.sampler import StepResult, accept_mask, unpinned_entropy
from engine.sequence import Sequence
from models.attend import Attend, sdpa
from models.diffusion_gemma import DiffusionGemma


class ReferenceRunner(ModelRunner):
    def admit(self, seqs: list[Sequence]) -> None:
        super().admit(seqs)
        for seq in seqs:
            if seq.params.seed is not None:
                torch.manual_seed(seq.params.seed)  # generate() reads the global generator (spec 6.3)

    def noise(self, seq: Sequence) -> torch.Tensor:
        """The global generator, shape [1, C] as generate() draws it."""
        return torch.randint(0, self.config.vocab_size, (1, self.config.canvas_length), device=self.device)[0]

    def forward(self, seqs: list[Sequence], inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row as generate() runs it: exact keys, its own SDPA calls, the global generator."""
        (seq,) = seqs
        inputs = {name: x.to(self.device) for name, x in inputs.items()}
        c = self.config.canvas_length
        positions = seq.length + torch.arange(c, device=self.device)[None]
        soft = self.canvases.soft[:1] if seq.canvas_steps else None
        hidden = self.model.denoise(self.canvases.canvas[:1], positions, reference_attention(self.pool, seq, c), soft)
        p = seq.params
        temperature = schedule_temperature(p.steps - seq.canvas_steps, p.t_min, p.t_max, p.steps)
        canvas, pinned = self.canvases.canvas[:1], self.canvases.pinned[:1]
        result = reference_step(self.model, hidden, canvas, pinned, temperature, p.entropy_bound)
        return self.update(result, inputs), hidden


def reference_attention(pool: KVPool, seq: Sequence, canvas_length: int) -> Attend:
    """One row, its exact keys in the reference's order, SDPA called as the reference calls it (spec 9.4)."""
    index = [t.to(pool.device) for t in pool.token_index(seq.pages, seq.length, seq.length + canvas_length)]
    table = torch.tensor([seq.pages], device=pool.device)

    def attend(layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        if pool.config.layers[layer].is_sliding:
            held_k, held_v = pool.held_sliding(layer, seq.slot, seq.length)
            keys, values = torch.cat([held_k, k[0]], dim=1), torch.cat([held_v, v[0]], dim=1)
        else:
            pool.keys[layer][index[0], :, index[1]] = k[0].transpose(0, 1)
            pool.values[layer][index[0], :, index[1]] = v[0].transpose(0, 1)
            keys, values = pool.full_keys(layer, table)
            keys, values = keys[0, :, : seq.length + canvas_length], values[0, :, : seq.length + canvas_length]
        return sdpa(q, keys[None], values[None], None)

    return attend


def schedule_temperature(steps_left: int, t_min: float, t_max: float, max_steps: int) -> torch.Tensor:
    """T = t_min + (t_max - t_min) * n / N with n the steps remaining, as fp32 tensor arithmetic (spec 6.2)."""
    n = torch.tensor(steps_left, dtype=torch.int32)
    return t_min + (t_max - t_min) * (n / max_steps)


@torch.inference_mode()
def reference_step(
    model: DiffusionGemma,
    hidden: torch.Tensor,  # [1, C, H]
    canvas: torch.Tensor,  # [1, C]
    pinned: torch.Tensor,  # [1, C] bool
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
    entropy, mean_entropy = unpinned_entropy(torch.distributions.Categorical(logits=zt).entropy(), pinned)
    accept = accept_mask(entropy, torch.tensor([entropy_bound], device=entropy.device))
    accepted = torch.where(accept, proposal, canvas)
    noise = torch.randint(0, vocab, canvas.shape, device=canvas.device)
    next_canvas = torch.where(~accept, noise, accepted)
    sc_logits = zt.to(model.embed_tokens.weight.dtype)
    return StepResult(next_canvas, argmax, entropy, mean_entropy, model.sc_embedding(sc_logits))
