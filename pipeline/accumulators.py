"""Streaming, mergeable per-neuron statistics of one layer.

Every statistic is a sum (or a min/max), so accumulators of shards or resumed chunks merge
exactly and memory does not grow with the token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUM_FIELDS = ("sum", "sum_sq", "sum_abs", "sum_cube", "sum_quad")
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.int32)
_kernel = None


def _fused_kernel():
    """One pass over a float32 block: float64 moments, min, max, active counts and packed bits.

    Parallel over blocks of 64 neurons, each with local accumulators, so threads never share
    an output element and the result does not depend on the thread count.
    """
    global _kernel
    if _kernel is not None:
        return _kernel
    from numba import njit, prange

    @njit(parallel=True, cache=True, nogil=True)
    def fused(x, thr, sums, mn, mx, act, packed):
        n, d = x.shape
        block = 64
        for blk in prange((d + block - 1) // block):
            j0 = blk * block
            w = min(j0 + block, d) - j0
            s1 = np.zeros(block)
            s2 = np.zeros(block)
            sa = np.zeros(block)
            s3 = np.zeros(block)
            s4 = np.zeros(block)
            lo = np.full(block, np.inf)
            hi = np.full(block, -np.inf)
            ac = np.zeros(block, np.int64)
            bits = np.zeros(block, np.uint8)
            for r in range(n):
                for k in range(w):
                    v = np.float64(x[r, j0 + k])
                    v2 = v * v
                    s1[k] += v
                    s2[k] += v2
                    sa[k] += abs(v)
                    s3[k] += v2 * v
                    s4[k] += v2 * v2
                    lo[k] = min(lo[k], v)
                    hi[k] = max(hi[k], v)
                    on = x[r, j0 + k] > thr
                    ac[k] += on
                    bits[k] = on
                for b in range((w + 7) // 8):
                    byte = 0
                    for k in range(8):
                        if b * 8 + k < w:
                            byte |= bits[b * 8 + k] << k
                    packed[r, j0 // 8 + b] = byte
            for k in range(w):
                sums[0, j0 + k] += s1[k]
                sums[1, j0 + k] += s2[k]
                sums[2, j0 + k] += sa[k]
                sums[3, j0 + k] += s3[k]
                sums[4, j0 + k] += s4[k]
                mn[j0 + k] = min(mn[j0 + k], lo[k])
                mx[j0 + k] = max(mx[j0 + k], hi[k])
                act[j0 + k] += ac[k]

    _kernel = fused
    return fused


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

    def update_and_pack(self, acts) -> tuple[np.ndarray, np.ndarray]:
        """Add a block [tokens, width] and return its packed active bits and active count per row.

        On the CPU one fused numba pass does it all; on CUDA the torch path stays on the device.
        """
        import torch

        from pipeline.arrays import pack_mask

        x = torch.as_tensor(acts).reshape(-1, self.width)
        if x.device.type != "cpu":
            self.update(x)
            active = x > self.active_threshold
            return pack_mask(active), active.sum(1, dtype=torch.int32).cpu().numpy()
        x = np.ascontiguousarray(x.to(torch.float32).numpy())
        packed = np.empty((x.shape[0], (self.width + 7) // 8), np.uint8)
        sums = np.stack([self.sums[k] for k in SUM_FIELDS])
        _fused_kernel()(x, np.float32(self.active_threshold), sums, self.min, self.max,
                        self.active_count, packed)
        for i, k in enumerate(SUM_FIELDS):
            self.sums[k] = sums[i]
        self.count += x.shape[0]
        return packed, _POPCOUNT8[packed].sum(1, dtype=np.int32)

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

    def copy(self) -> NeuronMoments:
        return self.merge(NeuronMoments(self.width, self.active_threshold))

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
