"""Independent references shared by the tests: what a test compares the pipeline with."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def mlp_inputs(model_dir, input_ids, *, batch_size: int = 8) -> dict[int, np.ndarray]:
    """{layer: float32 [tokens, d_mlp]}: the input of every GPT-2 block's mlp.c_proj on
    `input_ids` ([sequences, length] or one sequence), by forward pre-hooks written here, on a
    fresh Hugging Face model (not through pipeline.models.hooks)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.asarray(input_ids)).long()
    ids = ids[None] if ids.ndim == 1 else ids
    seen: dict[int, list[torch.Tensor]] = {l: [] for l in range(len(model.transformer.h))}
    handles = [block.mlp.c_proj.register_forward_pre_hook(
        lambda _m, args, l=l: seen[l].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for l, block in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model.transformer(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(v).numpy() for l, v in seen.items()}
