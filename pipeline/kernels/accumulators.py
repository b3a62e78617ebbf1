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
    by_power = [np.broadcast_to(np.asarray(n, np.float64), delta.shape), *power_sums]
    return [sum(comb(k, j) * delta ** (k - j) * by_power[j] for j in range(k + 1))
            for k in range(1, 5)]


def first_block_shift(x64: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The shift of an accumulator: its first block's mean per neuron (a torch float64 tensor
    [tokens, width]; with `weight` [tokens, 1 or width] 0/1, the mean of the accumulated entries,
    0 where there is none), rounded to float32. Then a - K is exact in float64 for float32 a of
    comparable magnitude, and means that differ in their last float64 digits (CPU and
    accelerator reductions) give the same K but for a rare rounding tie."""
    import torch

    if weight is None:
        return x64.mean(0).to(torch.float32).to(torch.float64)
    n = weight.expand_as(x64).sum(0)
    return ((x64 * weight).sum(0) / n.clamp(min=1)).to(torch.float32).to(torch.float64)


def _weights(x: torch.Tensor, rows, routed) -> torch.Tensor | None:
    """0/1 float64 [tokens, 1 or width] of the accumulated entries (None: all of them)."""
    import torch

    if rows is None and routed is None:
        return None
    w = torch.ones((x.shape[0], 1), dtype=torch.float64, device=x.device)
    if rows is not None:
        w = w * torch.as_tensor(rows, device=x.device).reshape(-1, 1).to(torch.float64)
    if routed is not None:
        w = w * torch.as_tensor(routed, device=x.device).reshape(x.shape).to(torch.float64)
    return w


@dataclass
class NeuronMoments:
    """Sums over the accumulated entries of one layer's activations, float64, per neuron.

    An entry is (row, neuron): rows may be excluded (BOS, padding, sink positions) and, in a
    mixture-of-experts layer, a neuron sees only the rows routed to its expert, so the count is
    per neuron. `active_threshold` is the threshold of the key that marks a neuron active."""

    width: int
    active_threshold: float = 0.0
    count: np.ndarray = None  # type: ignore[assignment]  # entries per neuron (int64)
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
        if self.count is None:
            self.count = np.zeros(self.width, np.int64)
        elif np.ndim(self.count) == 0:
            self.count = np.full(self.width, int(self.count), np.int64)
        if self.min is None:
            self.min = np.full(self.width, np.inf)
            self.max = np.full(self.width, -np.inf)
            self.active_count = np.zeros(self.width, np.int64)

    @property
    def empty(self) -> bool:
        return self.shift is None and self._pending is None

    def update(self, acts, key=None, rows=None, routed=None) -> None:
        """Add a block of activations [tokens, width] (a torch tensor on any device, or NumPy).

        key (default acts) > active_threshold marks the active entries; rows (bool [tokens]) and
        routed (bool [tokens, width]) select the accumulated ones. The block is reduced where it
        lives into float64 partial sums kept there (no host sync per block on an accelerator);
        _sync() folds them into the NumPy fields."""
        import torch

        x = torch.as_tensor(acts).reshape(-1, self.width)
        if x.shape[0] == 0:
            return
        if self._pending is not None and self._pending["sums"].device != x.device:
            self._sync()
        x64 = x.to(torch.float64)
        weight = _weights(x, rows, routed)
        if self._pending is None:
            f64 = dict(dtype=torch.float64, device=x.device)
            self._pending = {
                "shift": (first_block_shift(x64, weight) if self.shift is None
                          else torch.as_tensor(self.shift, **f64)),
                "sums": torch.zeros((len(SUM_FIELDS), self.width), **f64),
                "min": torch.full((self.width,), float("inf"), **f64),
                "max": torch.full((self.width,), float("-inf"), **f64),
                "active_count": torch.zeros(self.width, dtype=torch.int64, device=x.device),
                "count": torch.zeros(self.width, dtype=torch.int64, device=x.device),
            }
        p = self._pending
        k = x if key is None else torch.as_tensor(key).reshape(x.shape)
        on = k > self.active_threshold
        if weight is None:
            d = x64 - p["shift"]
            d2 = d * d
            p["sums"] += torch.stack([x64.sum(0), x64.abs().sum(0), d.sum(0), d2.sum(0),
                                      (d2 * d).sum(0), (d2 * d2).sum(0)])
            torch.minimum(p["min"], x64.amin(0), out=p["min"])
            torch.maximum(p["max"], x64.amax(0), out=p["max"])
            p["active_count"] += on.sum(0)
            p["count"] += x.shape[0]
        else:
            kept = weight.expand_as(x64) > 0
            d = (x64 - p["shift"]) * weight
            d2 = d * d
            p["sums"] += torch.stack([(x64 * weight).sum(0), (x64.abs() * weight).sum(0),
                                      d.sum(0), d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0)])
            inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
            torch.minimum(p["min"], torch.where(kept, x64, inf).amin(0), out=p["min"])
            torch.maximum(p["max"], torch.where(kept, x64, -inf).amax(0), out=p["max"])
            p["active_count"] += (on & kept).sum(0)
            p["count"] += kept.sum(0)

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
        self.count = self.count + p["count"]
        self._pending = None

    def update_and_pack(self, acts, key=None, rows=None, routed=None,
                        out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Add a block [tokens, width] as update() does and return its packed active bits (key >
        active_threshold, where routed) and the active count per row. `out` (uint8 [tokens,
        ceil(width/8)], C-contiguous: a writer's commit buffer, say) receives the bits.

        On the CPU one fused numba pass does it all; on an accelerator the reductions and the
        bit packing run there, and only the packed bits (1/16 of fp16) come back per block.
        """
        import torch

        from pipeline.core.arrays import pack_mask

        x = torch.as_tensor(acts).reshape(-1, self.width)
        n = x.shape[0]
        k = x if key is None else torch.as_tensor(key).reshape(x.shape)
        if out is None:
            out = np.empty((n, (self.width + 7) // 8), np.uint8)
        if x.device.type != "cpu":
            self.update(x, k, rows, routed)
            on = k > self.active_threshold
            if routed is not None:
                on &= torch.as_tensor(routed, device=x.device).reshape(x.shape)
            out[...] = pack_mask(on)
            return out, np.bitwise_count(out).sum(1, dtype=np.int32)
        from pipeline.kernels.bitkernels import moments_and_pack

        self._sync()
        row_bytes = (np.ones(n, np.uint8) if rows is None
                     else np.ascontiguousarray(torch.as_tensor(rows).reshape(n).numpy(), np.uint8))
        routed_bytes = (np.zeros((n, 0), np.uint8) if routed is None else np.ascontiguousarray(
            torch.as_tensor(routed).reshape(x.shape).numpy(), np.uint8))
        if self.shift is None and n:
            self.shift = first_block_shift(x.to(torch.float64),
                                           _weights(x, rows, routed)).numpy()
        shift = self.shift if self.shift is not None else np.zeros(self.width)
        x32 = np.ascontiguousarray(x.to(torch.float32).numpy())
        k32 = x32 if key is None else np.ascontiguousarray(k.to(torch.float32).numpy())
        sums = np.stack([self.sums[f] for f in SUM_FIELDS])
        moments_and_pack(x32, k32, np.float32(self.active_threshold), row_bytes, routed_bytes,
                         shift, sums, self.min, self.max, self.active_count, self.count, out)
        for i, f in enumerate(SUM_FIELDS):
            self.sums[f] = sums[i]
        return out, np.bitwise_count(out).sum(1, dtype=np.int32)

    def merge(self, other: NeuronMoments) -> NeuronMoments:
        """The accumulator of both inputs, with this one's shift (the other's when this is empty):
        the other's power sums are re-centred onto it."""
        if other.width != self.width or other.active_threshold != self.active_threshold:
            raise ValueError("cannot merge accumulators of different layers or thresholds")
        self._sync()
        other._sync()
        shift = self.shift if self.shift is not None else other.shift
        theirs = [other.sums[k] for k in POWER_FIELDS]
        if other.shift is not None and self.shift is not None:
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
            "count": self.count.copy(),
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
            f"{prefix}/active_count": self.active_count, f"{prefix}/count": self.count,
            f"{prefix}/has_shift": np.array(self.shift is not None),
            f"{prefix}/meta": np.array([self.width, self.active_threshold], np.float64),
        })
        return out

    @classmethod
    def from_state(cls, state, prefix: str) -> NeuronMoments:
        width, threshold = state[f"{prefix}/meta"]
        return cls(
            width=int(width), active_threshold=float(threshold),
            count=np.array(state[f"{prefix}/count"]),
            shift=np.array(state[f"{prefix}/shift"]) if state[f"{prefix}/has_shift"] else None,
            sums={k: np.array(state[f"{prefix}/{k}"]) for k in SUM_FIELDS},
            min=np.array(state[f"{prefix}/min"]), max=np.array(state[f"{prefix}/max"]),
            active_count=np.array(state[f"{prefix}/active_count"]),
        )


COMBINATIONS = ("g+u+", "g+u-", "g-u+", "g-u-")  # g > 0 or not, u > 0 or not (GLUScope's four)


@dataclass
class SignStats:
    """Per neuron of a gated layer: for each sign combination of (g, u), the accumulated entries,
    their sum of |a|, and the `examples` entries of largest |a| (row, a), over the same entries as
    NeuronMoments (included rows, routed experts)."""

    width: int
    examples: int = 5
    count: np.ndarray = None  # type: ignore[assignment]    # int64 [4, width]
    sum_abs: np.ndarray = None  # type: ignore[assignment]  # float64 [4, width]
    top_abs: np.ndarray = None  # type: ignore[assignment]  # float32 [4, examples, width], -1 = none
    top_value: np.ndarray = None  # type: ignore[assignment]  # float32 a of those entries
    top_row: np.ndarray = None  # type: ignore[assignment]  # int64 rows of those entries, -1 = none

    def __post_init__(self) -> None:
        c, k, w = len(COMBINATIONS), self.examples, self.width
        if self.count is None:
            self.count = np.zeros((c, w), np.int64)
            self.sum_abs = np.zeros((c, w), np.float64)
            self.top_abs = np.full((c, k, w), -1.0, np.float32)
            self.top_value = np.zeros((c, k, w), np.float32)
            self.top_row = np.full((c, k, w), -1, np.int64)

    def update(self, a, g, u, first_row: int, rows=None, routed=None) -> None:
        """Add a block [tokens, width] whose first token is run row `first_row`."""
        import torch

        a = torch.as_tensor(a).reshape(-1, self.width).float()
        n = a.shape[0]
        if n == 0:
            return
        g = torch.as_tensor(g).reshape(a.shape)
        u = torch.as_tensor(u).reshape(a.shape)
        kept = torch.ones_like(a, dtype=torch.bool)
        if rows is not None:
            kept &= torch.as_tensor(rows, device=a.device).reshape(n, 1).bool()
        if routed is not None:
            kept &= torch.as_tensor(routed, device=a.device).reshape(a.shape).bool()
        combo = 2 * (g <= 0).to(torch.int8) + (u <= 0).to(torch.int8)
        size = a.abs()
        row_ids = torch.arange(first_row, first_row + n, device=a.device)
        k = min(self.examples, n)
        for c in range(len(COMBINATIONS)):
            here = kept & (combo == c)
            self.count[c] += here.sum(0).cpu().numpy()
            self.sum_abs[c] += torch.where(here, size.double(), 0.0).sum(0).cpu().numpy()
            if not self.examples:
                continue
            score = torch.where(here, size, torch.tensor(-1.0, device=a.device))
            best, where = score.topk(k, dim=0)
            values = a.gather(0, where)
            cand_abs = np.concatenate([self.top_abs[c], best.cpu().numpy()])
            cand_value = np.concatenate([self.top_value[c], values.cpu().numpy()])
            cand_row = np.concatenate([self.top_row[c], row_ids[where].cpu().numpy()])
            cand_row[cand_abs < 0] = -1
            self._keep_best(c, cand_abs, cand_value, cand_row)

    def _keep_best(self, c: int, cand_abs, cand_value, cand_row) -> None:
        """Keep the `examples` candidates of largest |a| of combination c; ties go to the
        earlier row, so the result depends neither on blocks nor on shards."""
        order = np.lexsort((np.where(cand_row < 0, np.iinfo(np.int64).max, cand_row),
                            -cand_abs.astype(np.float64)), axis=0)[:self.examples]
        self.top_abs[c] = np.take_along_axis(cand_abs, order, 0)
        self.top_value[c] = np.take_along_axis(cand_value, order, 0)
        self.top_row[c] = np.take_along_axis(cand_row, order, 0)

    def merge(self, other: SignStats) -> SignStats:
        """The statistics of both inputs (disjoint rows: shards of one run)."""
        if other.width != self.width or other.examples != self.examples:
            raise ValueError("cannot merge sign statistics of different layers or example counts")
        out = SignStats(self.width, self.examples, count=self.count + other.count,
                        sum_abs=self.sum_abs + other.sum_abs, top_abs=self.top_abs.copy(),
                        top_value=self.top_value.copy(), top_row=self.top_row.copy())
        for c in range(len(COMBINATIONS)):
            out._keep_best(c, np.concatenate([self.top_abs[c], other.top_abs[c]]),
                           np.concatenate([self.top_value[c], other.top_value[c]]),
                           np.concatenate([self.top_row[c], other.top_row[c]]))
        return out

    def tables(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sign_stats, sign_examples) columns of this layer, without neuron ids: sign_stats
        combination-major ([4 * width] rows, neuron fastest), sign_examples the entries found."""
        c, w = len(COMBINATIONS), self.width
        names = np.repeat(np.array(COMBINATIONS, dtype=object), w)
        count = self.count.reshape(-1)
        stats = {"neuron": np.tile(np.arange(w, dtype=np.int32), c), "combination": names,
                 "gate_open": np.repeat([True, True, False, False], w),
                 "up_positive": np.repeat([True, False, True, False], w), "count": count,
                 "mean_abs": np.where(count > 0, self.sum_abs.reshape(-1) / np.maximum(count, 1),
                                      np.nan)}
        found = self.top_row >= 0  # [4, k, w]
        combo, rank, neuron = np.nonzero(found)
        examples = {"neuron": neuron.astype(np.int32),
                    "combination": np.array(COMBINATIONS, dtype=object)[combo],
                    "rank": rank.astype(np.int32), "row": self.top_row[found],
                    "value": self.top_value[found], "abs_value": self.top_abs[found]}
        return stats, examples

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/{k}": getattr(self, k) for k in
                ("count", "sum_abs", "top_abs", "top_value", "top_row")}

    @classmethod
    def from_state(cls, state, prefix: str) -> SignStats:
        fields = {k: np.array(state[f"{prefix}/{k}"]) for k in
                  ("count", "sum_abs", "top_abs", "top_value", "top_row")}
        return cls(width=fields["count"].shape[1], examples=fields["top_abs"].shape[1], **fields)


def save_states(path: Path, moments: dict[int, NeuronMoments],
                signs: dict[int, SignStats] | None = None) -> None:
    from pipeline.core.storage import atomic_path

    arrays: dict[str, np.ndarray] = {}
    for layer, m in moments.items():
        arrays.update(m.state(f"L{layer}"))
    for layer, sign in (signs or {}).items():
        arrays.update(sign.state(f"S{layer}"))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_states(path: Path, layers: list[int], signs: bool = False
                ) -> tuple[dict[int, NeuronMoments], dict[int, SignStats]]:
    """The accumulators save_states wrote: (moments, sign stats; {} unless `signs`)."""
    from pipeline.core.storage import as_path

    # through a file object: the state may be on object storage
    with as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as state:
        if any(f"L{layer}/{k}" not in state for layer in layers for k in ("shift", "count")):
            raise UserError(f"the saved accumulators {path} predate per-neuron counts: delete the "
                            "run's folder and extract it again")
        return ({layer: NeuronMoments.from_state(state, f"L{layer}") for layer in layers},
                {layer: SignStats.from_state(state, f"S{layer}") for layer in layers} if signs
                else {})
