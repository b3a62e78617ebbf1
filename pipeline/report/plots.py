"""Figures (matplotlib, PNG): dormancy over training, sample activation maps, histograms.

    nwh plots --run demo-corpus --rows 0 50 200 --vis-mode cinematic --figure-rows 2
    nwh plots --dormancy-log dormancy_zoo-s0.csv --name zoo-s0-dormancy

Every function writes one PNG and returns its path; figures land under storage/reports/<name>/.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from pipeline.core import arrays, tables  # noqa: E402
from pipeline.core.config import Stage, at_least, config_hash, opt, to_dict  # noqa: E402
from pipeline.core.errors import UserError  # noqa: E402
from pipeline.core.inputs import input_fingerprint  # noqa: E402
from pipeline.core.storage import (
    Marker,  # noqa: E402
    Storage,
    atomic_path,
    validate_run_id,
)

log = logging.getLogger(__name__)

VIS_MODES = ("default", "cinematic", "cinematic_no_text")
LOG_COLUMNS_USED = ("revision", "step", "layer_index", "pct_dormant")  # of a dormancy log
LOG_RENAMES = {"layer_index": "layer", "layer_name": "site"}  # the log's names -> the table's
DPI = 100
WIDE = (12, 5.5)      # one figure per row of a page: 1200 px wide at DPI
MAP_COLUMNS = 8       # layer panels per row of a sample map unless --figure-rows says otherwise
MAP_ROW_INCHES = 2.5  # a row of square 2.2-inch panels with its titles clear of the row above
ANNOTATE_CELLS = 400  # heatmaps with at most this many cells print their values
# read at the size a page shows them (one figure per row, ~1200 px): larger than matplotlib's 10 pt
STYLE = {"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 13, "xtick.labelsize": 11,
         "ytick.labelsize": 11, "legend.fontsize": 11, "figure.titlesize": 15}
plt.rcParams.update(STYLE)
ACTIVE_COLORS = ("#0b1d51", "#ff2a2a")  # default sample maps: inactive / most active


def save_png(fig, path: Path, *, transparent: bool = False) -> Path:
    """Write a figure atomically as PNG and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, transparent=transparent)
    plt.close(fig)
    return path


# -- dormancy over checkpoints (input: rows of the dormancy table, or of a log read by
#    read_dormancy_log, which names the columns as the table does)


def _by_step(df: pl.DataFrame) -> pl.DataFrame:
    if df.is_empty():
        raise UserError("the dormancy log has no rows: run `nwh dormancy` or a sweep first")
    if df["step"].null_count() == df.height:
        # no step numbers (revisions not named step<k>): training order is the log's order
        order = {r: i for i, r in enumerate(dict.fromkeys(df["revision"].to_list()))}
        df = df.with_columns(pl.col("revision").replace_strict(order, return_dtype=pl.Int64)
                             .alias("step"))
    return df.sort("step", "layer")


def plot_dormancy_over_steps(df: pl.DataFrame, path: Path) -> Path:
    """Mean, min and max % dormant across layers, per training step."""
    agg = _by_step(df).group_by("step").agg(
        pl.col("pct_dormant").mean().alias("mean"), pl.col("pct_dormant").min().alias("min"),
        pl.col("pct_dormant").max().alias("max")).sort("step")
    fig, ax = plt.subplots(figsize=WIDE)
    steps = agg["step"].to_numpy()
    ax.fill_between(steps, agg["min"].to_numpy(), agg["max"].to_numpy(), alpha=0.25,
                    label="min-max over layers")
    ax.plot(steps, agg["mean"].to_numpy(), marker="o", label="mean over layers")
    if (steps > 0).sum() > 1 and steps.max() / max(steps[steps > 0].min(), 1) > 20:
        ax.set_xscale("symlog", linthresh=max(1, steps[steps > 0].min()))
    ax.set(xlabel="training step", ylabel="dormant neurons (%)",
           title=f"Dormant neurons over training {_model(df)}".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def _model(df: pl.DataFrame) -> str:
    """The model(s) a dormancy frame is of, for titles."""
    if "model" not in df.columns or df.is_empty():
        return ""
    return ", ".join(dict.fromkeys(str(m) for m in df["model"].to_list()))


def plot_dormancy_heatmap(df: pl.DataFrame, path: Path) -> Path:
    """Layer x checkpoint heatmap of % dormant; small grids print each cell's value."""
    df = _by_step(df)
    steps = sorted(set(df["step"].to_list()))
    layers = sorted(set(df["layer"].to_list()))
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in df.iter_rows(named=True):
        grid[layers.index(r["layer"]), steps.index(r["step"])] = r["pct_dormant"]
    fig, ax = plt.subplots(figsize=(max(WIDE[0], 0.7 * len(steps) + 3),
                                    max(4.5, 0.38 * len(layers) + 2.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    if grid.size <= ANNOTATE_CELLS:
        mid = np.nanmean(grid) if np.isfinite(grid).any() else 0
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=10,
                        color="white" if value < mid else "black")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set(xlabel="training step", ylabel="layer",
           title=f"Dormant neurons (%) per layer and checkpoint {_model(df)}".strip())
    fig.colorbar(im, ax=ax, label="% dormant")
    fig.tight_layout()
    return save_png(fig, path)


def plot_layer_evolution(df: pl.DataFrame, path: Path, top: int = 5) -> Path:
    """% dormant over training of the `top` layers whose dormancy varies most."""
    df = _by_step(df)
    spread = df.group_by("layer").agg(pl.col("pct_dormant").std().fill_null(0).alias("sd"))
    chosen = spread.sort("sd", descending=True)["layer"].head(top).to_list()
    fig, ax = plt.subplots(figsize=WIDE)
    for layer in sorted(chosen):
        sub = df.filter(pl.col("layer") == layer)
        ax.plot(sub["step"].to_numpy(), sub["pct_dormant"].to_numpy(), marker="o",
                label=f"layer {layer}")
    ax.set(xlabel="training step", ylabel="dormant neurons (%)",
           title=f"Most variable layers (top {len(chosen)} by std of % dormant) {_model(df)}"
           .strip())
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


# -- per-sample activation maps (the reference's visualize_sample_activations)


def _grid(values: np.ndarray) -> np.ndarray:
    side = math.ceil(math.sqrt(values.size))
    rows = math.ceil(values.size / side)
    out = np.full(rows * side, np.nan)
    out[: values.size] = values
    return out.reshape(rows, side)


def map_rows(n_layers: int, figure_rows: int | None = None) -> int:
    """Rows of layer panels: as asked, else MAP_COLUMNS layers a row (a 30-layer model's map
    wraps into 4 rows instead of one 6,650 px strip)."""
    if figure_rows is not None:
        return max(1, min(figure_rows, n_layers))
    return max(1, math.ceil(n_layers / MAP_COLUMNS))


def plot_sample_activations(layers: Sequence[np.ndarray], path: Path, *, mode: str = "default",
                            figure_rows: int | None = None, text: str = "", title: str = "",
                            label: str = "", values: bool = True) -> Path:
    """One heatmap per layer of a token row's neurons (active = 1 or activation values).

    default: blue (inactive) to red (the layer's largest value), a legend saying so, the title
    and the text; cinematic: white on black with the input text and `label` (the run) in grey,
    on a transparent background (a page shows it on a dark one); cinematic_no_text: no text."""
    if mode not in VIS_MODES:
        raise UserError(f"--vis-mode {mode!r} is unknown: use one of {', '.join(VIS_MODES)}")
    if figure_rows is not None and figure_rows < 1:
        raise UserError("--figure-rows must be at least 1")
    n = len(layers)
    rows = map_rows(n, figure_rows)
    cols = math.ceil(n / rows)
    cinematic = mode != "default"
    bg = "black" if cinematic else ACTIVE_COLORS[0]
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list(
        "act", ["black", "white"] if cinematic else list(ACTIVE_COLORS))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.5, MAP_ROW_INCHES * rows + 1.2),
                             squeeze=False)
    if not cinematic:
        fig.patch.set_facecolor("white")
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        layer_values = np.asarray(layers[k], dtype=np.float64)
        ax.set_facecolor(bg)
        ax.imshow(_grid(layer_values), cmap=cmap, vmin=0,
                  vmax=max(1e-9, np.nanmax(layer_values)), interpolation="nearest")
        for spine in ax.spines.values():
            spine.set_visible(not cinematic)
        if mode == "default":
            ax.set_title(f"layer {k}: {int((layer_values > 0).sum())}/{layer_values.size} "
                         "active", fontsize=10)
    if mode == "default":
        fig.suptitle(title or "Neuron activations", fontsize=13)
        if text:
            fig.text(0.5, 0.01, text[-150:], ha="center", fontsize=10, wrap=True)
        high = "largest activation of the layer" if values else "active"
        low = "0 / inactive" if values else "inactive"
        fig.legend(handles=[Patch(color=ACTIVE_COLORS[0], label=low),
                            Patch(color=ACTIVE_COLORS[1], label=high)],
                   loc="upper right", fontsize=9, framealpha=0.9)
    elif mode == "cinematic":
        if text:
            fig.text(0.5, 0.02, text[-150:], ha="center", fontsize=10, color="white", wrap=True)
        if label:
            fig.text(0.99, 0.005, label, ha="right", va="bottom", fontsize=8, color="#9a9a9a")
    # room under the panels for up to three lines of text (an inch at most)
    height = MAP_ROW_INCHES * rows + 1.2
    bottom = min(0.3, (0.65 if text and mode != "cinematic_no_text" else 0.2) / height)
    fig.tight_layout(rect=(0, bottom, 1, 1 - min(0.1, 0.45 / height)))
    return save_png(fig, path, transparent=cinematic)


# -- histograms of arrays (node activation counts, edge weights, degrees)


def plot_histogram(values: np.ndarray, path: Path, *, title: str, xlabel: str, bins: int = 50,
                   log_y: bool = True, sample: int = 2_000_000, seed: int = 0) -> Path:
    """Histogram of `values`, sampled down to `sample` values when there are more."""
    values = np.asarray(values).ravel()
    note = ""
    if values.size > sample:
        values = np.random.default_rng(seed).choice(values, sample, replace=False)
        note = f" (sample of {sample:,})"
    fig, ax = plt.subplots(figsize=WIDE)
    ax.hist(values, bins=bins, color="#3b6ea5", edgecolor="white", linewidth=0.3)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="count", title=title + note)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


# -- stage: figures of a run and/or a dormancy log


def read_dormancy_log(path: str | Path) -> pl.DataFrame:
    """A dormancy log CSV (reference format) as a DataFrame with the dormancy table's column
    names (layer_index -> layer, layer_name -> site); 'N/A' steps become null."""
    try:
        df = pl.read_csv(path, null_values=["N/A"], infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"--dormancy-log {str(path)!r} is not a readable CSV "
                        f"({' '.join(str(e).split())[:120]}): pass a log of `nwh dormancy`") from None
    missing = [c for c in LOG_COLUMNS_USED if c not in df.columns]
    if missing:
        raise UserError(f"--dormancy-log {str(path)!r} lacks column(s) {missing}: pass a log of "
                        "`nwh dormancy --log-file`")
    return df.rename({k: v for k, v in LOG_RENAMES.items() if k in df.columns})


def map_uses_acts(manifest: dict) -> bool:
    """Whether a run's sample maps show activation values (every layer stored densely and a
    rule of a > t's kind) rather than the active bits of its rule."""
    from pipeline.kernels.active import run_rule

    layers = manifest["model"]["layers"]
    # a gated neuron's a > 0 is not its activity (the gate is): show the rule's bits there
    return (set(layers) <= set(manifest["model"].get("dense_layers", []))
            and run_rule(manifest).rule == "value")


def activation_map(group, manifest: dict, tokens, row: int) -> tuple[list[np.ndarray], str]:
    """Per-layer values of one token row (activations clipped at 0 when every layer was stored
    densely and the run's rule is a > 0's kind, else the active bits of its rule) and the text
    of its sequence up to that token."""
    layers, widths = manifest["model"]["layers"], manifest["model"]["widths"]
    use_acts = map_uses_acts(manifest)
    values = [group[f"acts/L{l}"][row].astype(np.float64).clip(0) if use_acts
              else arrays.unpack_mask(group[f"active/L{l}"][row:row + 1], widths[l])[0].astype(float)
              for l in layers]
    samples, positions = tokens["sample"].to_numpy(), tokens["position"].to_numpy()
    sel = np.flatnonzero((samples == samples[row]) & (positions <= positions[row]))
    return values, "".join(tokens["token"].take(sel).to_pylist())


def run_figures(storage: Storage, run: str, *, rows: Sequence[int] = (0,), mode: str = "default",
                figure_rows: int | None = None, name: str | None = None) -> list[Path]:
    """Sample activation maps of the given token rows and the node activation-count histogram."""
    manifest = storage.finished_run(run)
    bad = [r for r in rows if not 0 <= r < manifest["rows"]]
    if bad:
        raise UserError(f"row {bad[0]} is out of range: run {run!r} has rows "
                        f"0-{manifest['rows'] - 1}")
    out_dir = storage.reports(name or run)
    group = arrays.open_group(storage.arrays(run), mode="r")
    tokens = tables.read_partition(storage, "tokens", run)
    paths = []
    for row in rows:
        values, text = activation_map(group, manifest, tokens, row)
        title = (f"{run}: row {row} (sample {tokens['sample'][row].as_py()}, "
                 f"position {tokens['position'][row].as_py()})")
        paths.append(plot_sample_activations(values, out_dir / f"sample_{row}_{mode}.png",
                                             mode=mode, figure_rows=figure_rows, text=text,
                                             title=title, label=f"{run}: row {row}",
                                             values=map_uses_acts(manifest)))
    stats = tables.read_partition(storage, "neuron_stats", run)
    paths.append(plot_histogram(stats["active_count"].to_numpy(),
                                out_dir / "node_activation_counts.png",
                                title=f"{run}: node activation counts",
                                xlabel="token rows where active"))
    return paths


def dormancy_figures(df: pl.DataFrame, out_dir: Path, prefix: str = "") -> list[Path]:
    return [plot_dormancy_over_steps(df, out_dir / f"{prefix}dormancy_over_steps.png"),
            plot_dormancy_heatmap(df, out_dir / f"{prefix}dormancy_heatmap.png"),
            plot_layer_evolution(df, out_dir / f"{prefix}dormancy_layer_evolution.png")]


@dataclass(kw_only=True)
class PlotsConfig:
    run: str | None = opt(None, help="an extraction run: activation maps of --rows and the "
                          "node activation-count histogram")
    rows: list[int] = opt([0], help="token rows to draw, e.g. --rows 0 50 200")
    vis_mode: str = opt("default", choices=VIS_MODES, help="default (blue/red with text), "
                        "cinematic (black/white, input text), cinematic_no_text")
    figure_rows: int | None = opt(None, help="rows of layer panels (default: 8 layers a row)")
    dormancy_log: str | None = opt(None, help="a dormancy log CSV (reference format): dormancy "
                                   "over training, per-layer heatmap, most variable layers")
    save_prefix: str = opt("", help="prefix of the dormancy figure names")
    name: str | None = opt(None, help="report folder under storage/reports/ (default: the run, "
                           "else the log's file name)")

    def __post_init__(self) -> None:
        if not self.run and not self.dormancy_log:
            raise UserError("nothing to draw: give --run and/or --dormancy-log")
        for value in (self.run, self.name):
            if value:
                validate_run_id(value)
        if self.vis_mode not in VIS_MODES:
            raise UserError(f"--vis-mode {self.vis_mode!r} is unknown: use one of "
                            f"{', '.join(VIS_MODES)}")
        if self.figure_rows is not None:
            at_least(self, 1, "figure_rows")
        if not self.rows or min(self.rows) < 0:
            raise UserError(f"--rows {self.rows}: give token rows >= 0, e.g. --rows 0 50 200")
        if self.dormancy_log and not Path(self.dormancy_log).is_file():
            raise UserError(f"--dormancy-log {self.dormancy_log!r} is not a file: pass the CSV "
                            "written by `nwh dormancy --log-file`")


@dataclass
class PlotsResult:
    paths: list[Path]
    skipped: bool = False   # drawn before from the same inputs with this configuration


def run(config: PlotsConfig, storage: Storage) -> PlotsResult:
    out_dir = storage.reports(config.name or config.run or Path(config.dormancy_log).stem)
    # the marker sees the inputs: the extraction drawn from and the log's content
    digest = config_hash(
        config, log=input_fingerprint(config.dormancy_log),
        extraction=storage.finished_run(config.run).get("config_hash") if config.run else None)
    marker = Marker(out_dir / f".plots-{digest}.json")
    done = marker.done(digest)
    if done is not None and all(Path(p).exists() for p in done["paths"]):
        return PlotsResult([Path(p) for p in done["paths"]], skipped=True)
    paths = []
    if config.run:
        paths += run_figures(storage, config.run, rows=config.rows, mode=config.vis_mode,
                             figure_rows=config.figure_rows, name=config.name)
    if config.dormancy_log:
        out_dir = storage.reports(config.name or Path(config.dormancy_log).stem)
        paths += dormancy_figures(read_dormancy_log(config.dormancy_log), out_dir,
                                  config.save_prefix)
    marker.write(to_dict(config), digest, paths=[str(p) for p in paths])
    return PlotsResult(paths)


def show(result: PlotsResult) -> str:
    head = ["figures are drawn from these inputs already: nothing to do"] if result.skipped else []
    return "\n".join(head + [f"figure: {p}" for p in result.paths])


STAGES = [Stage(
    "plots", "Figures of a run (sample activation maps) and of a dormancy log.",
    "  nwh plots --run demo-corpus --rows 0 50 200\n"
    "  nwh plots --run demo-corpus --rows 7 --vis-mode cinematic --figure-rows 2\n"
    "  nwh plots --dormancy-log zoo-s0_dormancy.csv --name zoo-s0 --save-prefix zoo_\n",
    PlotsConfig, run, show)]
