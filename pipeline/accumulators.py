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

    def __post_init__(self) -> None:
        for name in SUM_FIELDS:
            self.sums.setdefault(name, np.zeros(self.width, np.float64))
        if self.min is None:
            self.min = np.full(self.width, np.inf)
            self.max = np.full(self.width, -np.inf)
            self.active_count = np.zeros(self.width, np.int64)

    def update(self, acts) -> None:
        """Add a block of activations [tokens, width] (a torch tensor on any device, or NumPy)."""
        import torch

        x = torch.as_tensor(acts).reshape(-1, self.width).to(torch.float64)
        x2 = x * x
        partial = {
            "sum": x.sum(0),
            "sum_sq": x2.sum(0),
            "sum_abs": x.abs().sum(0),
            "sum_cube": (x2 * x).sum(0),
            "sum_quad": (x2 * x2).sum(0),
        }
        for name, value in partial.items():
            self.sums[name] += value.cpu().numpy()
        if x.shape[0]:
            np.minimum(self.min, x.amin(0).cpu().numpy(), out=self.min)
            np.maximum(self.max, x.amax(0).cpu().numpy(), out=self.max)
        self.active_count += (x > self.active_threshold).sum(0).cpu().numpy()
        self.count += x.shape[0]

    def merge(self, other: NeuronMoments) -> NeuronMoments:
        if other.width != self.width or other.active_threshold != self.active_threshold:
            raise ValueError("cannot merge accumulators of different layers or thresholds")
        return NeuronMoments(
            width=self.width,
            active_threshold=self.active_threshold,
            count=self.count + other.count,
            sums={k: self.sums[k] + other.sums[k] for k in SUM_FIELDS},
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
            active_count=self.active_count + other.active_count,
        )

    def columns(self) -> dict[str, np.ndarray]:
        """Columns of the neuron_stats table for this layer (without ids)."""
        return {
            "count": np.full(self.width, self.count, np.int64),
            **{k: v.copy() for k, v in self.sums.items()},
            "min": self.min.copy(),
            "max": self.max.copy(),
            "active_count": self.active_count.copy(),
        }

    # -- persistence for resumable runs (NumPy .npz, never pickle)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
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
    from pipeline.storage import atomic_path

    arrays: dict[str, np.ndarray] = {}
    for layer, m in moments.items():
        arrays.update(m.state(f"L{layer}"))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_states(path: Path, layers: list[int]) -> dict[int, NeuronMoments]:
    with np.load(path, allow_pickle=False) as state:
        return {layer: NeuronMoments.from_state(state, f"L{layer}") for layer in layers}
