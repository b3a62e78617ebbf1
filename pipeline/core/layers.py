"""Parsing of layer selections such as "0-3", "0,2,5" or "all"."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.core.errors import UserError


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Sorted unique layer indices of `spec` within range(n_layers); None/'all' means every layer."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part.lstrip("-")[0:] and not part.startswith("-"):
                lo, hi = part.split("-", 1)
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UserError(
            f"layer spec {spec!r} is malformed: use a range like '0-3', a list like '0,2,5', or 'all'"
        ) from None
    bad = sorted(x for x in out if x < 0 or x >= n_layers)
    if bad:
        raise UserError(
            f"layer spec {spec!r} names layer(s) {bad} but the model has {n_layers} layers "
            f"(0-{n_layers - 1})"
        )
    return sorted(out)


def check_neuron(widths: Mapping[int, int], layer: int, neuron: int, owner: str,
                 flag: str = "neuron ") -> None:
    """One-line refusal of a (layer, neuron) that `owner` (e.g. "run 'x'") does not record;
    `widths` maps each recorded layer to its width. `flag` prefixes the neuron in the message (an option)."""
    if layer not in widths:
        raise UserError(f"{flag}{layer}/{neuron} is out of range: {owner} has no layer {layer} "
                        f"(layers: {', '.join(map(str, sorted(widths)))}): pick one of those")
    if not 0 <= neuron < widths[layer]:
        raise UserError(f"{flag}{layer}/{neuron} is out of range: layer {layer} of {owner} has "
                        f"neurons 0..{widths[layer] - 1}")
