"""Sampled generation with a KV cache and an explicit torch.Generator (reproducible per prompt)."""

from __future__ import annotations

import inspect

import torch


def _cache_name(model) -> str:
    """The KV-cache argument (and output field) of the model's forward: `cache` in recent
    transformers, `past_key_values` (deprecated there) before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    model, prompt_ids: list[int], *, new_tokens: int, num_samples: int, temperature: float,
    top_k: int, generator: torch.Generator, device: torch.device,
) -> torch.Tensor:
    """[num_samples, len(prompt) + new_tokens] token ids; temperature 0 means greedy.

    Generates exactly `new_tokens` tokens (no early stop at EOS), as the reference tools do.
    """
    cache = _cache_name(model)
    ids = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    past = getattr(out, cache)
    logits = out.logits[:, -1, :]
    pieces = [ids]
    for step in range(new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
        pieces.append(nxt)
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, use_cache=True, **{cache: past})
            past, logits = getattr(out, cache), out.logits[:, -1, :]
    return torch.cat(pieces, dim=1)


def prompt_generator(seed: int, prompt_index: int) -> torch.Generator:
    """The CPU generator of one prompt: a run resumes, and an ablation replays, prompt by prompt."""
    return torch.Generator().manual_seed(seed * 1_000_003 + prompt_index)


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids [batch, 1] from last-position logits."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # sample on the CPU generator so CPU and CUDA runs draw the same tokens for a seed
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
