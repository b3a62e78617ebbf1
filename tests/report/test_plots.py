"""Every figure renders a non-empty PNG of the expected size."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest

from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.report.plots import (
    DPI,
    dormancy_figures,
    plot_histogram,
    plot_sample_activations,
    run_figures,
)
from pipeline.core.storage import Storage


def check_png(path, size_inches=None, alpha=False):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    if size_inches:
        assert img.shape[:2] == (round(size_inches[1] * DPI), round(size_inches[0] * DPI))
    assert img[..., :3].std() > 0.01  # not one flat colour
    if alpha:
        assert img.shape[2] == 4 and (img[..., 3] < 1).any()
    return img


def log_frame():
    rows = []
    for step in (0, 10, 100, 1000):
        for layer in range(4):
            rows.append({"model": "m", "revision": f"step{step}", "step": step, "layer_index": layer,
                         "pct_dormant": float(layer * step % 37), "num_neurons": 10})
    return pl.DataFrame(rows)


def test_dormancy_figures(tmp_path):
    paths = dormancy_figures(log_frame(), tmp_path, "p_")
    assert [p.name for p in paths] == ["p_dormancy_over_steps.png", "p_dormancy_heatmap.png",
                                       "p_dormancy_layer_evolution.png"]
    check_png(paths[0], (8, 4.5))
    for p in paths[1:]:
        check_png(p)


@pytest.mark.parametrize("mode,rows", [("default", 1), ("cinematic", 2), ("cinematic_no_text", 3)])
def test_sample_maps(tmp_path, mode, rows):
    layers = [np.random.default_rng(l).random(40) * (np.random.default_rng(l).random(40) > 0.5)
              for l in range(5)]
    path = plot_sample_activations(layers, tmp_path / "s.png", mode=mode, figure_rows=rows,
                                   text="def f(x): return x")
    cols = -(-5 // rows)
    check_png(path, (2.2 * cols + 0.5, 2.2 * rows + 1.2), alpha=mode != "default")
    with pytest.raises(UserError):
        plot_sample_activations(layers, tmp_path / "x.png", mode="noir")


def test_histogram_samples_large_input(tmp_path):
    path = plot_histogram(np.random.default_rng(0).exponential(size=50_000), tmp_path / "h.png",
                          title="Edge weights", xlabel="weight", sample=10_000)
    check_png(path, (7, 4.2))


def test_run_figures(tmp_path, micro_model_dir, corpus_file):
    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=3,
                          max_length=8, run="p"), storage, progress=False)
    paths = run_figures(storage, "p", rows=[0, 5], mode="cinematic", figure_rows=1)
    assert len(paths) == 3 and all(p.parent == storage.reports("p") for p in paths)
    for p in paths:
        check_png(p)
    with pytest.raises(UserError, match="out of range"):
        run_figures(storage, "p", rows=[99])


def test_report_page_links_every_figure(tmp_path, micro_model_dir, corpus_file):
    import re

    from pipeline.report.html import caption, write_report

    storage = Storage(tmp_path)
    extract(ExtractConfig(model=str(micro_model_dir), corpus=str(corpus_file), num_samples=3,
                          max_length=8, run="r"), storage, progress=False)
    run_figures(storage, "r", rows=[1])
    page = write_report(storage, "rep", ["r"], {"runs": "select * from runs"})
    text = page.read_text()
    images = re.findall(r'src="([^"]+)"', text)
    assert len(images) == 2 and all((page.parent / i).exists() for i in images)
    assert (page.parent / "tables" / "runs.csv").exists() and "runs</a> (1 rows)" in text
    assert caption("sample_1_default") == "Neuron activations of every layer at token row 1 (default mode)."
