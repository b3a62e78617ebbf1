"""Shared fixtures: seeded micro models built in-process (random weights, tiny tokenizer)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.storage import Storage
from pipeline.models.micro import WORDS, save_random_gpt2


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("micro-gpt2")
    save_random_gpt2(directory)
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
