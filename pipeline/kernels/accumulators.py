"""Streaming, mergeable per-neuron statistics of one layer.

Every statistic is a sum (or a min/max), so accumulators of shards or resumed chunks merge
exactly and memory does not grow with the token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUM_FIELDS = ("sum", "sum_sq", "sum_abs", "sum_cube", "sum_quad")


@dataclass
class NeuronMoments:
    """Sums over token positions of one layer's activations, float64, one entry per neuron."""

    width: int
    active_threshold: float = 0.0
    count: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    min: np.ndarray = None  # type: ignore[assignment]
    max: np.ndarray = None  # type: ignore[assignment]
    active_count: np.ndarray = None  # type: ignore[assignment]
    # torch partial sums of update(), on the device of the blocks, folded into the NumPy fields
    # above by _sync() before anything reads them
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
        if self._pending is not None and self._pending["sums"].device != x.device:
            self._sync()
        if self._pending is None:
            f64 = dict(dtype=torch.float64, device=x.device)
            self._pending = {
                "sums": torch.zeros((len(SUM_FIELDS), self.width), **f64),
                "min": torch.full((self.width,), float("inf"), **f64),
                "max": torch.full((self.width,), float("-inf"), **f64),
                "active_count": torch.zeros(self.width, dtype=torch.int64, device=x.device),
            }
        p = self._pending
        x64 = x.to(torch.float64)
        x2 = x64 * x64
        p["sums"] += torch.stack([x64.sum(0), x2.sum(0), x64.abs().sum(0), (x2 * x64).sum(0),
                                  (x2 * x2).sum(0)])
        if x.shape[0]:
            torch.minimum(p["min"], x64.amin(0), out=p["min"])
            torch.maximum(p["max"], x64.amax(0), out=p["max"])
        p["active_count"] += (x > self.active_threshold).sum(0)
        self.count += x.shape[0]

    def _sync(self) -> None:
        """Fold the partial sums of update() into the NumPy fields (one transfer)."""
        if self._pending is None:
            return
        p = {k: v.cpu().numpy() for k, v in self._pending.items()}
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

        x = np.ascontiguousarray(x.to(torch.float32).numpy())
        packed = np.empty((x.shape[0], (self.width + 7) // 8), np.uint8)
        sums = np.stack([self.sums[k] for k in SUM_FIELDS])
        moments_and_pack(x, np.float32(self.active_threshold), sums, self.min, self.max,
                         self.active_count, packed)
        for i, k in enumerate(SUM_FIELDS):
            self.sums[k] = sums[i]
        self.count += x.shape[0]
        return packed, np.bitwise_count(packed).sum(1, dtype=np.int32)

    def merge(self, other: NeuronMoments) -> NeuronMoments:
        if other.width != self.width or other.active_threshold != self.active_threshold:
            raise ValueError("cannot merge accumulators of different layers or thresholds")
        self._sync()
        other._sync()
        return NeuronMoments(
            width=self.width,
            active_threshold=self.active_threshold,
            count=self.count + other.count,
            sums={k: self.sums[k] + other.sums[k] for k in SUM_FIELDS},
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
            **{k: v.copy() for k, v in self.sums.items()},
            "min": self.min.copy(),
            "max": self.max.copy(),
            "active_count": self.active_count.copy(),
        }

    # -- persistence for resumable runs (NumPy .npz, never pickle)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        self._sync()
        out = {f"{prefix}/{k}": v for k, v in self.sums.items()}
        out.update({
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
        return {layer: NeuronMoments.from_state(state, f"L{layer}") for layer in layers}
