"""Random-weight models built in-process, for tests and benchmarks (no hub needed)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the value of a list returns an object with keys and items for each argument "
         "raise error if none is given else return default string number file path").split()


def synthetic_texts(n: int, *, words_per_text: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_text)) for _ in range(n)]


def make_tokenizer(directory: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a fixed synthetic text, saved in HF format."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(synthetic_texts(200), vocab_size=vocab_size,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(directory)
    return tok


def save_random_gpt2(directory: Path, *, seed: int = 0, n_layer: int = 3, d_model: int = 32,
                     n_head: int = 4, d_mlp: int = 40, n_positions: int = 128,
                     vocab_size: int | None = None):
    """A random GPT-2 with a small trained tokenizer, saved to `directory` (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=n_head, n_inner=d_mlp,
                        n_positions=n_positions, vocab_size=vocab_size or len(tok),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    return model, tok


def save_random_llama(directory: Path, *, seed: int = 0, n_layer: int = 2, d_model: int = 32,
                      n_head: int = 4, d_mlp: int = 48, max_positions: int = 64):
    """A random Llama (gated SiLU MLP: a = silu(g) * u) with the small tokenizer, saved to
    `directory` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layer,
                         num_attention_heads=n_head, num_key_value_heads=n_head // 2,
                         vocab_size=len(tok), max_position_embeddings=max_positions,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    return model, tok
