"""When a neuron is active: the rule a run records, and the mask it gives.

    value  a > t             the seeds' definition; the default of non-gated MLPs (GELU, ReLU)
    gate   g > t             the gate pre-activation is open; the default of gated MLPs, where
                             a = act(g) * u takes the sign of u and `a > 0` is a coin flip
    abs    |a| > t
    topk   the K largest |a| of each token in each layer (t is not used)

Each rule is a key compared with a threshold, so the CPU kernel that packs the mask and
accumulates the moments in one pass serves them all (topk's key is its 0/1 mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.errors import UserError

if TYPE_CHECKING:
    import torch

RULES = ("value", "gate", "abs", "topk")


def default_rule(gated: bool) -> str:
    return "gate" if gated else "value"


@dataclass(frozen=True)
class ActiveRule:
    rule: str = "value"
    threshold: float = 0.0
    topk: int = 0

    @classmethod
    def resolve(cls, rule: str | None, threshold: float, topk: int | None, *, gated: bool,
                widths: list[int] | dict[int, int]) -> ActiveRule:
        """The rule of a run on a model (gated or not, with these layer widths), checked; None
        picks the model's default. One-line UserError on a rule the model cannot have."""
        check_threshold(threshold)
        rule = rule or default_rule(gated)
        if rule not in RULES:
            raise UserError(f"--active-rule {rule!r} is not one of {', '.join(RULES)}")
        if rule == "gate" and not gated:
            raise UserError("--active-rule gate needs a gated MLP (a = act(g) * u), and this "
                            "model's MLP has no gate: use value, abs or topk")
        widths = list(widths.values()) if isinstance(widths, dict) else list(widths)
        if rule == "topk":
            if not topk or topk < 1 or topk > min(widths):
                raise UserError(f"--active-rule topk needs --topk K between 1 and the narrowest "
                                f"recorded layer's width ({min(widths)}), got {topk}")
        elif topk:
            raise UserError(f"--topk is used only with --active-rule topk, not {rule}")
        return cls(rule, float(threshold), int(topk or 0))

    @property
    def key_threshold(self) -> float:
        """The threshold of key(): topk's key is a 0/1 mask."""
        return 0.5 if self.rule == "topk" else self.threshold

    def key(self, a: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """The values that are compared with key_threshold (a itself for `value`, no copy)."""
        import torch

        if self.rule == "value":
            return a
        if self.rule == "gate":
            if g is None:
                raise ValueError("the gate rule needs the gate pre-activation g")
            return g
        if self.rule == "abs":
            return a.abs()
        top = a.abs().topk(self.topk, dim=-1).indices
        return torch.zeros_like(a, dtype=torch.float32).scatter_(-1, top, 1.0)

    def mask(self, a: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.key(a, g) > self.key_threshold

    def describe(self) -> str:
        """The rule in words, for reports: 'g > 0', 'top 32 |a|'."""
        t = f"{self.threshold:g}"
        return {"value": f"a > {t}", "gate": f"g > {t}", "abs": f"|a| > {t}",
                "topk": f"top {self.topk} |a|"}[self.rule]

    def record(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "topk": self.topk}


def check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UserError(f"--active-threshold must be a finite number, got {threshold}")


def run_rule(manifest: dict) -> ActiveRule:
    """The active rule a run recorded (runs before rules were recorded used `value`)."""
    active = manifest.get("active") or {
        "rule": "value", "threshold": manifest.get("config", {}).get("active_threshold", 0.0),
        "topk": 0}
    return ActiveRule(active["rule"], float(active["threshold"]), int(active.get("topk", 0)))
