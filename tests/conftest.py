"""Shared fixtures: seeded micro models built in-process (random weights, tiny tokenizer)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.storage import Storage

WORDS = ("the value of a list returns an object with keys and items for each argument "
         "raise error if none is given else return default string number file path").split()


def make_tokenizer(directory: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a fixed synthetic text, saved in HF format."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(directory)
    return tok


def make_micro_gpt2(directory: Path, *, seed: int = 0, n_layer: int = 3, d_mlp: int = 40):
    """A random micro GPT-2 (3 layers, 40 neurons each) with its tokenizer, saved to `directory`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_inner=d_mlp, n_positions=128,
                        vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    return model, tok


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("micro-gpt2")
    make_micro_gpt2(directory)
    return directory


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(80)]
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture()
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "storage")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
