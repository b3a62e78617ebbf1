"""Sampled generation with a KV cache and an explicit torch.Generator (reproducible per prompt)."""

from __future__ import annotations

import inspect

import torch

from pipeline.core.errors import UserError


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
    An encoder (a masked-LM, which predicts no next token) is refused in one line.
    """
    check_can_generate(model)
    cache = _cache_name(model)
    ids = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    past = getattr(out, cache, None)
    if past is None and new_tokens > 1:  # a model without a KV cache would crash a step later
        raise UserError(f"{type(model).__name__} returned no KV cache ({cache}), so it cannot "
                        "generate here: use a causal LM")
    logits = out.logits[:, -1, :]
    pieces = [ids]
    for step in range(new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
        pieces.append(nxt)
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, use_cache=True, **{cache: past})
            past, logits = getattr(out, cache), out.logits[:, -1, :]
    return torch.cat(pieces, dim=1)


def max_positions(model) -> int | None:
    """The context length of a model's config (max_position_embeddings, GPT-2's n_positions;
    a multimodal config's text part), None when it names none."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (text, config):
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(c, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_positions(model, needed: int, fix: str) -> None:
    """A one-line UserError when `needed` positions exceed the model's context, before a
    position-embedding lookup fails with an index error."""
    limit = max_positions(model)
    if limit and needed > limit:
        raise UserError(f"{needed} positions are needed but the model has {limit}: {fix}")


def check_can_generate(model) -> None:
    """A one-line UserError for a model that cannot generate (an encoder's masked-LM head)."""
    can = getattr(model, "can_generate", None)
    if callable(can) and not can():
        raise UserError(f"{type(model).__name__} is not a causal LM and cannot generate: "
                        "generation needs a decoder-only model")


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
