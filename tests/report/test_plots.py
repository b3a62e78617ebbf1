"""Figures: the data each one plots (read back from the figure's artists) against values computed
in the test from the inputs, and the PNG each one writes."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.report import analysis as analysis_figures
from pipeline.report import plots
from pipeline.report.plots import (
    DPI,
    PlotsConfig,
    dormancy_figures,
    plot_histogram,
    plot_sample_activations,
    read_dormancy_log,
    run,
)

WIDTH, LAYERS = 40, 3


@pytest.fixture()
def drawn(monkeypatch) -> dict:
    """Every figure saved while the test runs, by file name (artists stay readable)."""
    figures = {}
    save = plots.save_png

    def record(fig, path, **kwargs):
        figures[Path(path).name] = fig
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_png", record)
    monkeypatch.setattr(analysis_figures, "save_png", record)
    return figures


def check_png(path, size_inches=None, alpha=False):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    if size_inches:
        assert img.shape[:2] == (round(size_inches[1] * DPI), round(size_inches[0] * DPI))
    assert img[..., :3].std() > 0.01  # not one flat colour
    if alpha:
        assert img.shape[2] == 4 and (img[..., 3] < 1).any()
    return img


# -- dormancy


LOG = [(f"step{step}", step, layer, float(layer * step % 37) + 0.1 * layer)
       for step in (0, 10, 100, 1000) for layer in range(7)]


def log_frame(rows=LOG):
    return pl.DataFrame([{"model": "m", "revision": r, "step": s, "layer": l,
                          "pct_dormant": p, "num_neurons": 10} for r, s, l, p in rows])


def by_step(rows):
    out = defaultdict(list)
    for _, step, _, pct in rows:
        out[step].append(pct)
    return dict(sorted(out.items()))


def test_dormancy_over_steps_plots_mean_min_max(tmp_path, drawn):
    paths = dormancy_figures(log_frame(), tmp_path, "p_")
    assert [p.name for p in paths] == ["p_dormancy_over_steps.png", "p_dormancy_heatmap.png",
                                       "p_dormancy_layer_evolution.png"]
    check_png(paths[0], plots.WIDE)
    ax = drawn["p_dormancy_over_steps.png"].axes[0]
    steps = by_step(LOG)
    (line,) = ax.lines
    assert line.get_xdata().tolist() == list(steps)
    assert line.get_ydata().tolist() == pytest.approx([statistics.mean(v) for v in steps.values()])
    band = ax.collections[0].get_paths()[0].vertices
    for step, values in steps.items():
        ys = band[band[:, 0] == step, 1]
        assert min(ys) == pytest.approx(min(values)) and max(ys) == pytest.approx(max(values))


def test_dormancy_heatmap_is_the_layer_step_grid(tmp_path, drawn):
    paths = dormancy_figures(log_frame(), tmp_path)
    check_png(paths[1])
    image = drawn["dormancy_heatmap.png"].axes[0].images[0].get_array()
    steps = list(by_step(LOG))
    want = np.zeros((7, len(steps)))
    for _, step, layer, pct in LOG:
        want[layer, steps.index(step)] = pct
    np.testing.assert_allclose(np.asarray(image), want)


def test_layer_evolution_shows_the_most_variable_layers(tmp_path, drawn):
    paths = dormancy_figures(log_frame(), tmp_path)
    check_png(paths[2])
    series = defaultdict(list)
    for _, step, layer, pct in LOG:
        series[layer].append((step, pct))
    spread = sorted(series, key=lambda l: -statistics.stdev(p for _, p in series[l]))[:5]
    ax = drawn["dormancy_layer_evolution.png"].axes[0]
    assert sorted(line.get_label() for line in ax.lines) == sorted(f"layer {l}" for l in spread)
    for line in ax.lines:
        points = sorted(series[int(line.get_label().split()[1])])
        assert line.get_xdata().tolist() == [s for s, _ in points]
        assert line.get_ydata().tolist() == pytest.approx([p for _, p in points])


def write_log(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "model", "revision", "step", "threshold", "layer_name",
                    "layer_index", "num_neurons", "num_dormant", "pct_dormant", "avg_activation",
                    "max_activation"])
        for revision, step, layer, pct in rows:
            w.writerow(["2026-01-01T00:00:00", "m", revision, "N/A" if step is None else step,
                        0.1, f"h.{layer}", layer, 10, round(pct / 10), pct, 0.5, 1.0])
    return path


def test_log_without_steps_keeps_the_log_order(tmp_path, drawn):
    """Revisions not named step<k> are in training order as logged, not in name order."""
    rows = [(rev, None, layer, 10.0 * k + layer)
            for k, rev in enumerate(("init", "middle", "final")) for layer in range(2)]
    log = write_log(tmp_path / "sweep.csv", rows)
    storage = Storage(tmp_path / "s")
    result = run(PlotsConfig(dormancy_log=str(log)), storage)
    assert [p.parent for p in result.paths] == [storage.reports("sweep")] * 3
    (line,) = drawn["dormancy_over_steps.png"].axes[0].lines
    assert line.get_ydata().tolist() == pytest.approx([0.5, 10.5, 20.5])  # init, middle, final


def test_log_read_back_from_csv(tmp_path, drawn):
    log = write_log(tmp_path / "zoo.csv", LOG)
    run(PlotsConfig(dormancy_log=str(log), name="d", save_prefix="z_"), Storage(tmp_path / "s"))
    image = drawn["z_dormancy_heatmap.png"].axes[0].images[0].get_array()
    assert np.asarray(image)[3, 2] == pytest.approx(3 * 100 % 37 + 0.3)  # layer 3, step 100
    # read back with the dormancy table's names, so its rows and a log's draw alike
    frame = read_dormancy_log(log)
    assert {"layer", "site"} <= set(frame.columns) and "layer_index" not in frame.columns
    assert frame["layer"].to_list() == [layer for _, _, layer, _ in LOG]
    assert frame["site"].to_list() == [f"h.{layer}" for _, _, layer, _ in LOG]


# -- activation maps and histograms


def grid(values) -> np.ndarray:
    """Row-major square-ish grid of the values, nan-padded."""
    side = math.ceil(math.sqrt(len(values)))
    cells = [float(v) for v in values] + [math.nan] * (side * math.ceil(len(values) / side)
                                                       - len(values))
    return np.array(cells).reshape(-1, side)


@pytest.mark.parametrize("mode,rows", [("default", 1), ("cinematic", 2), ("cinematic_no_text", 3)])
def test_sample_maps(tmp_path, drawn, mode, rows):
    rng = np.random.default_rng(0)
    layers = [rng.random(WIDTH) * (rng.random(WIDTH) > 0.5) for _ in range(5)]
    path = plot_sample_activations(layers, tmp_path / "s.png", mode=mode, figure_rows=rows,
                                   text="def f(x): return x")
    cols = -(-5 // rows)
    check_png(path, (2.2 * cols + 0.5, plots.MAP_ROW_INCHES * rows + 1.2),
              alpha=mode != "default")
    axes = [ax for ax in drawn["s.png"].axes if ax.images]
    assert len(axes) == 5
    for k, (ax, values) in enumerate(zip(axes, layers)):
        np.testing.assert_array_equal(np.ma.filled(ax.images[0].get_array(), np.nan), grid(values))
        if mode == "default":
            assert ax.get_title() == f"layer {k}: {sum(v > 0 for v in values)}/{WIDTH} active"
    texts = [t.get_text() for t in drawn["s.png"].texts]
    assert ("def f(x): return x" in texts) == (mode != "cinematic_no_text")
    with pytest.raises(UserError):
        plot_sample_activations(layers, tmp_path / "x.png", mode="noir")


def test_many_layers_wrap_into_rows_by_default(tmp_path, drawn):
    """30 layers: 8 panels a row (4 rows), not one 30-panel strip; --figure-rows still rules."""
    layers = [np.random.default_rng(l).random(16) for l in range(30)]
    path = plot_sample_activations(layers, tmp_path / "w.png", title="run r")
    check_png(path, (2.2 * 8 + 0.5, plots.MAP_ROW_INCHES * 4 + 1.2))
    fig = drawn["w.png"]
    assert len([ax for ax in fig.axes if ax.images]) == 30
    assert fig.axes[8].get_position().y0 < fig.axes[0].get_position().y0  # a second row
    plot_sample_activations(layers, tmp_path / "one.png", figure_rows=1)
    assert check_png(tmp_path / "one.png").shape[1] == round((2.2 * 30 + 0.5) * DPI)


def test_default_map_has_a_legend_of_its_colours(tmp_path, drawn):
    layers = [np.arange(6.0), np.zeros(6)]
    plot_sample_activations(layers, tmp_path / "v.png", values=True)
    (legend,) = drawn["v.png"].legends
    assert [t.get_text() for t in legend.get_texts()] == ["0 / inactive",
                                                          "largest activation of the layer"]
    colors = [matplotlib.colors.to_hex(h.get_facecolor()) for h in legend.legend_handles]
    assert colors == list(plots.ACTIVE_COLORS)
    plot_sample_activations(layers, tmp_path / "b.png", values=False)
    assert [t.get_text() for t in drawn["b.png"].legends[0].get_texts()] == ["inactive", "active"]
    plot_sample_activations(layers, tmp_path / "c.png", mode="cinematic", label="run r: row 3")
    assert not drawn["c.png"].legends and "run r: row 3" in [t.get_text() for t in
                                                              drawn["c.png"].texts]


def test_universal_layers_without_universal_neurons_says_so(tmp_path, monkeypatch):
    from pipeline.report import universal as uni

    figures = {}
    save = uni.save_png
    monkeypatch.setattr(uni, "save_png", lambda fig, path, **k: figures.setdefault(
        Path(path).name, fig) and save(fig, path, **k))
    rng = np.random.default_rng(0)
    neurons = pl.DataFrame({"layer": np.repeat([0, 1, 2], 20).astype(np.int32),
                            "neuron": np.tile(np.arange(20), 3).astype(np.int32),
                            "excess": rng.uniform(0, 0.15, 60), "universal": [False] * 60})
    neurons = neurons.with_columns(pl.when((pl.col("layer") == 1) & (pl.col("neuron") == 4))
                                   .then(0.18).otherwise(pl.col("excess")).alias("excess"))
    check_png(uni.plot_layers(neurons, tmp_path / "u.png", threshold=0.5, name="uni"))
    ax = figures["u.png"].axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "no universal neuron at 0.5; the largest excess is 0.18 (layer 1, neuron 4)" in texts
    assert texts.count("0") == 3  # no universal neuron in any layer
    boxes = [line for line in ax.lines if len(line.get_ydata()) == 2 and
             line.get_ydata()[0] != line.get_ydata()[1]]
    assert boxes and "uni" in ax.get_title()
    flagged = neurons.with_columns((pl.col("excess") > 0.1).alias("universal"))
    uni.plot_layers(flagged, tmp_path / "f.png", threshold=0.1)
    per_layer = flagged.group_by("layer").agg(pl.col("universal").sum()).sort("layer")
    texts = [t.get_text() for t in figures["f.png"].axes[0].texts]
    assert texts == [str(n) for n in per_layer["universal"].to_list()]


def test_dormancy_heatmap_prints_its_values(tmp_path, drawn):
    dormancy_figures(log_frame(), tmp_path)
    ax = drawn["dormancy_heatmap.png"].axes[0]
    assert sorted(float(t.get_text()) for t in ax.texts) == \
        pytest.approx(sorted(round(p, 1) for *_, p in LOG), abs=0.051)
    assert "m" in ax.get_title()  # the model is named


def test_histogram_counts(tmp_path, drawn):
    values = np.random.default_rng(0).exponential(size=5_000)
    check_png(plot_histogram(values, tmp_path / "h.png", title="t", xlabel="x"), plots.WIDE)
    heights = [p.get_height() for p in drawn["h.png"].axes[0].patches]
    assert heights == np.histogram(values, bins=50)[0].tolist()


def test_histogram_samples_large_input(tmp_path, drawn):
    values = np.random.default_rng(0).exponential(size=50_000)
    plot_histogram(values, tmp_path / "h.png", title="Edge weights", xlabel="weight",
                   sample=10_000)
    ax = drawn["h.png"].axes[0]
    assert sum(p.get_height() for p in ax.patches) == 10_000
    assert ax.patches[0].get_x() >= values.min() and "sample of 10,000" in ax.get_title()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_model_dir, corpus_file) -> Storage:
    storage = Storage(tmp_path_factory.mktemp("plots"))
    for run_id, extra in (("dense", ["--store-acts"]), ("masks", [])):
        assert main(["extract", "--storage", str(storage.root), "--model", str(micro_model_dir),
                     "--corpus", str(corpus_file), "--num-samples", "3", "--max-length", "8",
                     "--run", run_id, "--quiet", *extra]) == 0
    return storage


def expected_maps(storage: Storage, run_id: str, dense: bool) -> list[list[np.ndarray]]:
    group = zarr.open_group(str(storage.arrays(run_id)), mode="r")
    if dense:
        return [np.maximum(np.asarray(group[f"acts/L{l}"][:], np.float64), 0) for l in range(LAYERS)]
    return [np.unpackbits(np.asarray(group[f"active/L{l}"][:]), axis=1,
                          bitorder="little")[:, :WIDTH].astype(float) for l in range(LAYERS)]


def tokens_of(storage: Storage, run_id: str) -> dict:
    (part,) = storage.table_partition("tokens", run_id).glob("*.parquet")
    return pq.read_table(part).to_pydict()


@pytest.mark.parametrize("run_id,dense", [("dense", True), ("masks", False)])
def test_run_maps_plot_the_row(runs, drawn, run_id, dense):
    result = run(PlotsConfig(run=run_id, rows=[0, 5], vis_mode="cinematic"), runs)
    assert [p.name for p in result.paths] == ["sample_0_cinematic.png", "sample_5_cinematic.png",
                                              "node_activation_counts.png"]
    assert all(p.parent == runs.reports(run_id) for p in result.paths)
    for p in result.paths:
        check_png(p)
    maps, tokens = expected_maps(runs, run_id, dense), tokens_of(runs, run_id)
    for row in (0, 5):
        fig = drawn[f"sample_{row}_cinematic.png"]
        images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
        for l, image in enumerate(images):
            np.testing.assert_allclose(np.ma.filled(image, np.nan), grid(maps[l][row]))
        text = "".join(t for s, p, t in zip(tokens["sample"], tokens["position"], tokens["token"])
                       if s == tokens["sample"][row] and p <= tokens["position"][row])
        assert [t.get_text() for t in fig.texts] == [text[-150:], f"{run_id}: row {row}"]
    counts = np.concatenate([m > 0 for m in expected_maps(runs, run_id, False)], axis=1).sum(0)
    heights = [p.get_height() for p in drawn["node_activation_counts.png"].axes[0].patches]
    assert heights == np.histogram(counts, bins=50)[0].tolist()


def test_run_rows_out_of_range(runs):
    with pytest.raises(UserError, match="out of range"):
        run(PlotsConfig(run="masks", rows=[99]), runs)


def test_cli(runs, capsys, tmp_path):
    assert main(["plots", "--storage", str(runs.root), "--run", "masks", "--rows", "1", "2",
                 "--name", "cli"]) == 0
    figures = [runs.reports("cli") / "sample_1_default.png",
               runs.reports("cli") / "sample_2_default.png",
               runs.reports("cli") / "node_activation_counts.png"]
    assert capsys.readouterr().out.split() == [x for f in figures for x in ("figure:", str(f))]
    stamps = [f.stat().st_mtime_ns for f in figures]
    assert main(["plots", "--storage", str(runs.root), "--run", "masks", "--rows", "1", "2",
                 "--name", "cli"]) == 0  # the same inputs: nothing redrawn
    assert "nothing to do" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in figures] == stamps
    figures[0].unlink()  # a figure removed by hand is drawn again
    assert main(["plots", "--storage", str(runs.root), "--run", "masks", "--rows", "1", "2",
                 "--name", "cli"]) == 0
    assert "nothing to do" not in capsys.readouterr().out and figures[0].exists()
    for argv in (["--rows", "1"], ["--dormancy-log", str(tmp_path / "missing.csv")],
                 ["--run", "masks", "--figure-rows", "0"], ["--run", "masks", "--rows", "-1"]):
        assert main(["plots", "--storage", str(runs.root), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


# -- analysis figures (pipeline/report/analysis.py)


class Result:
    run = "an"

    def __init__(self, tables):
        self.tables = tables


def analysis_tables() -> dict[str, pl.DataFrame]:
    rng = np.random.default_rng(1)
    important = pl.DataFrame([
        {"rank_by": by, "rank": k + 1, "neuron_id": n, "layer": n // WIDTH, "neuron": n % WIDTH,
         "frequency": 1 - k / 40, "mean": 2 - k / 30}
        for by in ("frequency", "mean") for k, n in enumerate(rng.permutation(30).tolist())
    ]).sample(fraction=1.0, shuffle=True, seed=0)  # a table's rows come in no particular order
    clusters = pl.DataFrame({"row": np.arange(50), "token": ["t"] * 50,
                             "cluster": rng.integers(0, 3, 50).astype(np.int32),
                             "pc1": rng.normal(size=50), "pc2": rng.normal(size=50)})
    specific = pl.DataFrame({"kind": ["token"] * 12 + ["position"] * 7,
                             "ratio": (1.5 + rng.exponential(size=19)).tolist()})
    return {"important_neurons": important, "token_clusters": clusters,
            "specific_neurons": specific}


def test_analysis_figures_plot_the_tables(tmp_path, drawn):
    tables = analysis_tables()
    storage = Storage(tmp_path)
    paths = analysis_figures.draw(Result(tables), None, storage)
    assert [p.name for p in paths] == ["important_neurons.png", "token_clusters.png",
                                       "specific_neurons.png"]
    for p in paths:
        assert p.parent == storage.reports("an")
        check_png(p)
    important = tables["important_neurons"]
    for ax, by in zip(drawn["important_neurons.png"].axes, ("frequency", "mean")):
        top = sorted((r for r in important.iter_rows(named=True) if r["rank_by"] == by),
                     key=lambda r: r["rank"])[:20]
        bars = ax.patches[::-1]  # drawn bottom-up: the first bar is the last rank
        assert [b.get_width() for b in bars] == pytest.approx([r[by] for r in top])
        labels = [t.get_text() for t in ax.get_yticklabels()][::-1]
        assert labels == [f"L{r['layer']}.{r['neuron']}" for r in top]
    scatter = drawn["token_clusters.png"].axes[0].collections[0]
    clusters = tables["token_clusters"]
    np.testing.assert_allclose(scatter.get_offsets(),
                               np.column_stack([clusters["pc1"], clusters["pc2"]]))
    assert scatter.get_array().tolist() == clusters["cluster"].to_list()
    ax = drawn["specific_neurons.png"].axes[0]
    per_kind = [sum(p.get_height() for p in container) for container in ax.containers]
    assert per_kind == [12, 7]  # token, then position
    ratios = tables["specific_neurons"].filter(pl.col("kind") == "token")["ratio"].to_numpy()
    assert [p.get_height() for p in ax.containers[0]] == \
        np.histogram(np.log2(ratios), bins=30)[0].tolist()
