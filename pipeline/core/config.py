"""Stage configs are dataclasses; their field metadata become the CLI's options and --help.

A field declares its help with `opt(default, help="...")`. `add_arguments` turns a dataclass
into argparse options and `from_args` builds the config back, so each stage's CLI is generated
from its config (validated in `__post_init__`). Options that many stages share are declared
once here: `ModelOptions` (model, revision, device, dtype, trust-remote-code) and
`WindowOptions` (corpus windows). A stage is registered by a `Stage` entry naming its config,
its `run(config, storage)` and how the CLI shows its result.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pipeline.core.errors import UserError

T = TypeVar("T")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_text, metavar=f.metadata.get("metavar"))
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        if tp is bool:
            parser.add_argument(
                _flag(f), dest=f.name, action=argparse.BooleanOptionalAction,
                default=default, help=help_text,
            )
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if "const" in f.metadata:  # an option whose value may be left out: --ray [ADDRESS]
            kwargs.update(nargs="?", const=f.metadata["const"])
        if typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0]
            kwargs.update(nargs="+", type=inner)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default not in (None, "", [], ()):
                kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(_flag(f), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values.update(overrides)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if hasattr(v, "__fspath__"):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_hash(config: Any, **extra: Any) -> str:
    """Hash of the fields that change a result (fields declared with hash=False are left out),
    plus `extra` resolved values (a resolved dtype, an input fingerprint)."""
    values = to_dict(config)
    d = {f.name: values[f.name] for f in dataclasses.fields(config) if f.metadata.get("hash", True)}
    d.update(extra)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:  # noqa: A002
    """A config field with CLI help; meta: choices, flag, metavar, positional, cli=False, hash=False,
    const (the value of the option given without one)."""
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(config: Any, minimum: int | float, *names: str) -> None:
    """One-line error for the first of `names` below `minimum`."""
    for name in names:
        if getattr(config, name) < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got "
                            f"{getattr(config, name)}")


# -- options shared by many stages, declared once


@dataclass(kw_only=True)
class ModelOptions:
    """The model a stage loads (extract, trace, ablate, gradients, universal, neuron-stats)."""

    model: str = opt(help="zoo name (zoo-s0), local folder (./my-model) or hub id (gpt2, "
                     "EleutherAI/pythia-70m-deduped)")
    revision: str | None = opt(None, help="checkpoint: zoo subfolder (step256) or hub git "
                               "revision (step1000); default the final one")
    device: str = opt("auto", help="auto (CUDA when present), cpu, cuda or cuda:N", hash=False)
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, "
                     "bfloat16", hash=False)
    trust_remote_code: bool = opt(False, help="allow model code from the hub (off unless asked)")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of models.loading.load_model."""
        return {"device": self.device, "dtype": self.dtype,
                "trust_remote_code": self.trust_remote_code}


@dataclass(kw_only=True)
class WindowOptions:
    """Corpus windows of max_length tokens: the model's framing tokens (BOS, [CLS] ... [SEP])
    around documents joined by EOS, cut in order or from document starts."""

    corpus: str = opt("stdlib", help="stdlib, stdlib:heldout, a .txt/.jsonl/.parquet/.csv file, "
                      "or a datasets hub name")
    dataset_config: str | None = opt(None, help="config name of a hub dataset (wikitext-2-raw-v1)")
    split: str = opt("train", help="split of a hub dataset")
    text_column: str = opt("text", help="text column of a file or dataset")
    num_samples: int = opt(64, help="corpus windows")
    max_length: int = opt(128, help="tokens per window, framing tokens included")
    batch_size: int = opt(8, help="windows per forward pass", hash=False)
    prepend_bos: bool | None = opt(None, help="start every causal model's window with BOS "
                                   "(default: as the model's tokenizer does, e.g. Llama yes, "
                                   "GPT-2 no; encoders always get [CLS] ... [SEP])")
    window_mode: str = opt("concat", help="concat: cut the joined documents in order (a window "
                           "may start mid-document); document: start every window at a "
                           "document start, cutting the last document that does not fit",
                           choices=("concat", "document"))

    min_window = 1  # the next-token loss needs 2

    def check_windows(self) -> None:
        at_least(self, 1, "num_samples", "batch_size")
        at_least(self, self.min_window, "max_length")
        from pipeline.core.inputs import check_window_mode

        check_window_mode(self.window_mode)


@dataclass(kw_only=True)
class RowFilter:
    """Token rows left out of every accumulator; they stay in `tokens` (included = false) and
    in the masks."""

    exclude: str | None = opt(None, help="token classes left out of every accumulator: "
                              "bos,eos,pad,newline (any token holding a newline), "
                              "newline-token (the token of '\\n' alone); default none")
    skip_positions: int = opt(0, help="also leave out the first N positions of every sequence "
                              "(attention sinks)")

    def check_rows(self) -> None:
        at_least(self, 0, "skip_positions")
        from pipeline.core.inputs import parse_exclude

        parse_exclude(self.exclude)

    @property
    def excluded_classes(self) -> tuple[str, ...]:
        """The parsed --exclude: a tuple of pipeline.core.inputs.TOKEN_CLASSES."""
        from pipeline.core.inputs import parse_exclude

        return parse_exclude(self.exclude)


@dataclass(kw_only=True)
class Progress:
    quiet: bool = opt(False, help="no progress bars", hash=False)

    @property
    def progress(self) -> bool:
        return not self.quiet


# -- the stage registry


@dataclass(frozen=True)
class Stage:
    """One `nwh` subcommand: a config, its run(config, storage) and how the CLI shows results."""

    name: str
    help: str
    examples: str
    config: type
    run: Callable[..., Any]
    show: Callable[[Any], str] | None = None   # text printed after the run
    figures: str | None = None                 # pipeline.report.figures function drawing it
