"""Configs: the hash sees what changes a result, shared options are declared once, every stage
has the one shape (config dataclass + run), and the CLI is generated from the configs."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from pipeline.core.config import (
    ModelOptions,
    Stage,
    WindowOptions,
    add_arguments,
    config_hash,
    from_args,
    opt,
)
from pipeline.core.errors import UserError


@dataclasses.dataclass(kw_only=True)
class Example(ModelOptions, WindowOptions):
    threshold: float = opt(0.5, help="a threshold")
    quiet: bool = opt(False, help="no bars", hash=False)
    query: str = opt("x", help="positional", positional=True)

    def __post_init__(self):
        self.check_windows()


def test_hash_ignores_fields_that_do_not_change_results():
    a = Example(model="m")
    assert config_hash(a) == config_hash(Example(model="m", quiet=True, device="cpu",
                                                 batch_size=3))
    assert config_hash(a) != config_hash(Example(model="m", threshold=0.6))
    assert config_hash(a) != config_hash(Example(model="m"), dtype="torch.float16")


def test_shared_options_validate():
    with pytest.raises(UserError, match="--num-samples must be at least 1"):
        Example(model="m", num_samples=0)


def test_cli_round_trip_of_a_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    args = parser.parse_args(["q", "--model", "m", "--threshold", "0.25", "--quiet",
                              "--trust-remote-code"])
    config = from_args(Example, args)
    assert (config.query, config.model, config.threshold, config.quiet,
            config.trust_remote_code, config.num_samples) == ("q", "m", 0.25, True, True, 64)


def _stages() -> list[Stage]:
    from pipeline.cli import STAGE_MODULES

    out = []
    for name in STAGE_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "STAGES"), f"{name} has no STAGES list"
        out.extend(module.STAGES)
    return out


def test_every_stage_has_the_one_shape():
    stages = _stages()
    assert len({s.name for s in stages}) == len(stages)
    for stage in stages:
        assert dataclasses.is_dataclass(stage.config), stage.name
        assert callable(stage.run), stage.name
        for f in dataclasses.fields(stage.config):
            if f.metadata.get("cli") is not False:
                assert f.metadata.get("help"), f"{stage.name}: --{f.name} has no help"


def test_model_options_are_declared_once():
    """A stage that loads a model takes device, dtype and trust-remote-code, with the shared help
    unless it changes the default."""
    shared = {f.name: f for f in dataclasses.fields(ModelOptions)}
    for stage in _stages():
        names = {f.name: f for f in dataclasses.fields(stage.config)}
        if not issubclass(stage.config, ModelOptions):
            continue
        for name, field in shared.items():
            if name in ("model", "revision"):
                continue  # which model a stage loads is its own (ablate: the run's by default)
            assert name in names, (stage.name, name)
            if names[name].default == field.default:  # a stage's own default explains itself
                assert names[name].metadata["help"] == field.metadata["help"], (stage.name, name)
