"""Streaming, mergeable per-neuron statistics of one layer.

Every statistic is a sum (or a min/max), so accumulators of shards or resumed chunks merge
exactly and memory does not grow with the token count. The power sums are taken about a
per-neuron shift K, fixed at the first block (that block's mean, rounded to float32): raw sums
of a^k lose every digit of the variance and kurtosis of a neuron whose mean is large against
its spread (activations in the thousands at attention-sink positions), sums of (a - K)^k keep
them. Accumulators with different shifts merge exactly by the binomial expansion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import UserError

if TYPE_CHECKING:
    import torch

# rows of the float64 sums: raw Σa (mean ablation, reports) and Σ|a| (dormancy), then Σ(a-K)^k
SUM_FIELDS = ("sum", "sum_abs", "shifted_sum", "shifted_sum_sq", "shifted_sum_cube",
              "shifted_sum_quad")
POWER_FIELDS = SUM_FIELDS[2:]


def recentre(n, power_sums: list[np.ndarray], delta: np.ndarray) -> list[np.ndarray]:
    """Sums of (a - K')^k, k = 1..4, from the sums of (a - K)^k over n values, delta = K - K'.

    (a - K') = (a - K) + delta, so Σ(a - K')^k = Σ_j C(k, j) delta^(k-j) Σ(a - K)^j (Σ(a-K)^0 = n).
    """
    by_power = [np.full_like(delta, n, dtype=np.float64), *power_sums]
    return [sum(comb(k, j) * delta ** (k - j) * by_power[j] for j in range(k + 1))
            for k in range(1, 5)]


def first_block_shift(x64: torch.Tensor) -> torch.Tensor:
    """The shift of an accumulator: its first block's mean per neuron (a torch float64 tensor
    [tokens, width]), rounded to float32. Then a - K is exact in float64 for float32 a of
    comparable magnitude, and means that differ in their last float64 digits (CPU and
    accelerator reductions) give the same K but for a rare rounding tie."""
    import torch

    return x64.mean(0).to(torch.float32).to(torch.float64)


@dataclass
class NeuronMoments:
    """Sums over token positions of one layer's activations, float64, one entry per neuron."""

    width: int
    active_threshold: float = 0.0
    count: int = 0
    shift: np.ndarray | None = None  # K per neuron; None until the first non-empty block
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    min: np.ndarray = None  # type: ignore[assignment]
    max: np.ndarray = None  # type: ignore[assignment]
    active_count: np.ndarray = None  # type: ignore[assignment]
    # torch partial sums of update() (and their shift), on the device of the blocks, folded into
    # the NumPy fields above by _sync() before anything reads them
    _pending: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in SUM_FIELDS:
            self.sums.setdefault(name, np.zeros(self.width, np.float64))
        if self.min is None:
            self.min = np.full(self.width, np.inf)
            self.max = np.full(self.width, -np.inf)
            self.active_count = np.zeros(self.width, np.int64)

    def update(self, acts) -> None:
        """Add a block of activations [tokens, width] (a torch tensor on any device, or NumPy).

        The block is reduced where it lives into float64 partial sums kept there (no host sync
        per block on an accelerator); _sync() folds them into the NumPy fields."""
        import torch

        x = torch.as_tensor(acts).reshape(-1, self.width)
        if x.shape[0] == 0:
            return
        if self._pending is not None and self._pending["sums"].device != x.device:
            self._sync()
        x64 = x.to(torch.float64)
        if self._pending is None:
            f64 = dict(dtype=torch.float64, device=x.device)
            self._pending = {
                "shift": (first_block_shift(x64) if self.shift is None
                          else torch.as_tensor(self.shift, **f64)),
                "sums": torch.zeros((len(SUM_FIELDS), self.width), **f64),
                "min": torch.full((self.width,), float("inf"), **f64),
                "max": torch.full((self.width,), float("-inf"), **f64),
                "active_count": torch.zeros(self.width, dtype=torch.int64, device=x.device),
            }
        p = self._pending
        d = x64 - p["shift"]
        d2 = d * d
        p["sums"] += torch.stack([x64.sum(0), x64.abs().sum(0), d.sum(0), d2.sum(0),
                                  (d2 * d).sum(0), (d2 * d2).sum(0)])
        torch.minimum(p["min"], x64.amin(0), out=p["min"])
        torch.maximum(p["max"], x64.amax(0), out=p["max"])
        p["active_count"] += (x > self.active_threshold).sum(0)
        self.count += x.shape[0]

    def _sync(self) -> None:
        """Fold the partial sums of update() into the NumPy fields (one transfer)."""
        if self._pending is None:
            return
        p = {k: v.cpu().numpy() for k, v in self._pending.items()}
        if self.shift is None:
            self.shift = p["shift"]
        for i, name in enumerate(SUM_FIELDS):
            self.sums[name] = self.sums[name] + p["sums"][i]
        self.min = np.minimum(self.min, p["min"])
        self.max = np.maximum(self.max, p["max"])
        self.active_count = self.active_count + p["active_count"]
        self._pending = None

    def update_and_pack(self, acts) -> tuple[np.ndarray, np.ndarray]:
        """Add a block [tokens, width] and return its packed active bits and active count per row.

        On the CPU one fused numba pass does it all; on an accelerator the reductions and the
        bit packing run there, and only the packed bits (1/16 of fp16) come back per block.
        """
        import torch

        from pipeline.core.arrays import pack_mask

        x = torch.as_tensor(acts).reshape(-1, self.width)
        if x.device.type != "cpu":
            self.update(x)
            packed = pack_mask(x > self.active_threshold)
            return packed, np.bitwise_count(packed).sum(1, dtype=np.int32)
        from pipeline.kernels.bitkernels import moments_and_pack

        self._sync()
        if self.shift is None and x.shape[0]:
            self.shift = first_block_shift(x.to(torch.float64)).numpy()
        shift = self.shift if self.shift is not None else np.zeros(self.width)
        x = np.ascontiguousarray(x.to(torch.float32).numpy())
        packed = np.empty((x.shape[0], (self.width + 7) // 8), np.uint8)
        sums = np.stack([self.sums[k] for k in SUM_FIELDS])
        moments_and_pack(x, np.float32(self.active_threshold), shift, sums, self.min, self.max,
                         self.active_count, packed)
        for i, k in enumerate(SUM_FIELDS):
            self.sums[k] = sums[i]
        self.count += x.shape[0]
        return packed, np.bitwise_count(packed).sum(1, dtype=np.int32)

    def merge(self, other: NeuronMoments) -> NeuronMoments:
        """The accumulator of both inputs, with this one's shift (the other's when this is empty):
        the other's power sums are re-centred onto it."""
        if other.width != self.width or other.active_threshold != self.active_threshold:
            raise ValueError("cannot merge accumulators of different layers or thresholds")
        self._sync()
        other._sync()
        shift = self.shift if self.count else other.shift
        theirs = [other.sums[k] for k in POWER_FIELDS]
        if other.count and self.count:
            theirs = recentre(other.count, theirs, other.shift - shift)
        return NeuronMoments(
            width=self.width,
            active_threshold=self.active_threshold,
            count=self.count + other.count,
            shift=None if shift is None else shift.copy(),
            sums={"sum": self.sums["sum"] + other.sums["sum"],
                  "sum_abs": self.sums["sum_abs"] + other.sums["sum_abs"],
                  **{k: self.sums[k] + t for k, t in zip(POWER_FIELDS, theirs)}},
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
            active_count=self.active_count + other.active_count,
        )

    def copy(self) -> NeuronMoments:
        return self.merge(NeuronMoments(self.width, self.active_threshold))

    def columns(self) -> dict[str, np.ndarray]:
        """Columns of the neuron_stats table for this layer (without ids)."""
        self._sync()
        return {
            "count": np.full(self.width, self.count, np.int64),
            "shift": np.zeros(self.width) if self.shift is None else self.shift.copy(),
            **{k: self.sums[k].copy() for k in SUM_FIELDS},
            "min": self.min.copy(),
            "max": self.max.copy(),
            "active_count": self.active_count.copy(),
        }

    def summary(self) -> dict[str, np.ndarray]:
        """Mean, variance (population), skew and kurtosis (E[z^4]) per neuron, by the one
        definition of central moments (sql/moments.sql)."""
        from pipeline.core.warehouse import central_moments

        c = self.columns()
        return central_moments(c["count"], c["shift"], *(c[k] for k in POWER_FIELDS))

    # -- persistence for resumable runs (NumPy .npz, never pickle)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        self._sync()
        out = {f"{prefix}/{k}": v for k, v in self.sums.items()}
        out.update({
            f"{prefix}/shift": np.zeros(self.width) if self.shift is None else self.shift,
            f"{prefix}/min": self.min, f"{prefix}/max": self.max,
            f"{prefix}/active_count": self.active_count,
            f"{prefix}/meta": np.array([self.width, self.count, self.active_threshold], np.float64),
        })
        return out

    @classmethod
    def from_state(cls, state, prefix: str) -> NeuronMoments:
        width, count, threshold = state[f"{prefix}/meta"]
        return cls(
            width=int(width), active_threshold=float(threshold), count=int(count),
            shift=np.array(state[f"{prefix}/shift"]) if count else None,
            sums={k: np.array(state[f"{prefix}/{k}"]) for k in SUM_FIELDS},
            min=np.array(state[f"{prefix}/min"]), max=np.array(state[f"{prefix}/max"]),
            active_count=np.array(state[f"{prefix}/active_count"]),
        )


def save_states(path: Path, moments: dict[int, NeuronMoments]) -> None:
    from pipeline.core.storage import atomic_path

    arrays: dict[str, np.ndarray] = {}
    for layer, m in moments.items():
        arrays.update(m.state(f"L{layer}"))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_states(path: Path, layers: list[int]) -> dict[int, NeuronMoments]:
    with np.load(path, allow_pickle=False) as state:
        if any(f"L{layer}/shift" not in state for layer in layers):
            raise UserError(f"the saved accumulators {path} predate shifted moments: delete the "
                            "run's folder and extract it again")
        return {layer: NeuronMoments.from_state(state, f"L{layer}") for layer in layers}
