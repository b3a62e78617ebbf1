"""Stage configs are dataclasses; their field metadata become the CLI's options and --help.

A field declares its help with `field(default=..., metadata={"help": "...", "flag": "--x"})`.
`add_arguments` turns a dataclass into argparse options and `from_args` builds the config back,
so each stage's CLI is a thin layer over its config (validated in `__post_init__`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

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


def opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:  # noqa: A002
    """Shorthand for a config field with CLI help."""
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
