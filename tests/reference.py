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


def files_of(root) -> dict:
    """Every file under `root` with its bytes: a snapshot to show that nothing was written."""
    from pathlib import Path

    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def text_file_windows(model_dir, path, *, length: int, count: int) -> np.ndarray:
    """[count, length] token windows of a .txt corpus cut by hand: blank-line paragraphs, each
    tokenized without special tokens and followed by EOS, joined and cut in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    paragraphs = [p.strip() for p in open(path, encoding="utf-8").read().split("\n\n") if p.strip()]
    ids: list[int] = []
    for p in paragraphs:
        ids += tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.array(ids[:length * count]).reshape(count, length)


def gated_mlp_parts(model_dir, input_ids) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {"g", "u", "a"}} float32 [tokens, d_mlp] of a Llama-style model: the outputs of
    mlp.gate_proj and mlp.up_proj and the input of mlp.down_proj, by hooks written here on a
    fresh Hugging Face model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.asarray(input_ids)).long()
    ids = ids[None] if ids.ndim == 1 else ids
    layers = model.model.layers
    seen: dict[int, dict[str, torch.Tensor]] = {l: {} for l in range(len(layers))}

    def keep(l, name, pre):
        def hook(_m, args, out=None):
            x = args[0] if pre else out
            seen[l][name] = x.detach().reshape(-1, x.shape[-1])
        return hook

    handles = []
    for l, block in enumerate(layers):
        handles += [block.mlp.gate_proj.register_forward_hook(keep(l, "g", False)),
                    block.mlp.up_proj.register_forward_hook(keep(l, "u", False)),
                    block.mlp.down_proj.register_forward_pre_hook(keep(l, "a", True))]
    try:
        with torch.no_grad():
            model.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {l: {k: v.numpy() for k, v in parts.items()} for l, parts in seen.items()}
