"""The site (`nwh site`): a warehouse of micro runs built once, and every page's numbers checked
against the tables and arrays, computed here with NumPy / polars from the Parquet files and
Zarr arrays themselves (and the model's weights for the logit effects); bad input is one line,
exit 2, and writes nothing."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr
from reference import files_of

from pipeline.cli import STAGE_MODULES, main
from pipeline.core.storage import Storage
from pipeline.models.micro import save_random_gpt2, save_random_llama

TOP, LEADERS, EXAMPLES, CONTEXT, BINS, NEIGHBOURS, LOGITS = 5, 2, 6, 4, 12, 4, 5
PROMPTS = 'prompts,number_of_new_tokens,num_samples\n"the value of",5,1\n"raise error",4,1\n'


def nwh(*argv: str) -> int:
    """The CLI, with the site stage registered when the CLI does not list it yet."""
    if "pipeline.report.site" not in STAGE_MODULES:
        STAGE_MODULES.append("pipeline.report.site")
    return main(list(argv))


def build_warehouse(root: Path, model_a: Path, corpus: Path, *, full: bool = True) -> Storage:
    """Runs `dense` (dense activations, co-activation counts, dormancy, subsets, ablation),
    `masks` (masks only, same model), `gated` (a Llama, sign tables); with `full`, also a
    universal result of model_a vs a second seed and neuron gradients of model_a."""
    storage = Storage(root)
    s = str(root)
    common = ["--corpus", str(corpus), "--max-length", "16", "--quiet"]
    assert main(["extract", "--storage", s, "--model", str(model_a), "--num-samples", "8",
                 "--store-acts", "--run", "dense", *common]) == 0
    assert main(["extract", "--storage", s, "--model", str(model_a), "--num-samples", "5",
                 "--run", "masks", *common]) == 0
    llama = root.parent / f"{root.name}-llama"
    if not llama.exists():
        save_random_llama(llama)
    assert main(["extract", "--storage", s, "--model", str(llama), "--num-samples", "4",
                 "--run", "gated", *common]) == 0
    assert main(["coactivation", "--storage", s, "--run", "dense", "--quiet"]) == 0
    if not full:
        return storage
    assert main(["dormancy", "--storage", s, "--run", "dense", "--threshold", "0.2"]) == 0
    assert main(["dormancy", "--storage", s, "--run", "masks", "--threshold", "0.2"]) == 0
    for ratio in ("0.05", "0.1"):
        assert main(["subset", "--storage", s, "--run", "dense", "--threshold", "0.3",
                     "--ratio", ratio, "--method", "degree"]) == 0
    prompts = root / "prompts.csv"
    prompts.write_text(PROMPTS)
    names = sorted(p.stem for p in (storage.run_dir("dense") / "subsets").glob("*.npy"))
    assert main(["ablate", "--storage", s, "--run", "dense", "--subsets", *names, "--prompts",
                 str(prompts), "--controls", "4", "--corpus", str(corpus), "--num-samples", "3",
                 "--max-length", "8", "--device", "cpu", "--quiet"]) == 0
    model_b = root.parent / f"{root.name}-b"
    if not model_b.exists():
        save_random_gpt2(model_b, seed=7)
    assert main(["universal", "--storage", s, "--models", str(model_a), str(model_b),
                 "--name", "uni", "--num-samples", "4", "--max-length", "16", "--corpus",
                 str(corpus), "--device", "cpu", "--quiet"]) == 0
    assert main(["gradients", "--storage", s, "--model", str(model_a), "--name", "grads",
                 "--num-samples", "4", "--max-length", "16", "--corpus", str(corpus),
                 "--device", "cpu", "--quiet"]) == 0
    return storage


def site_args(storage: Storage, *extra: str) -> list[str]:
    return ["site", "--storage", str(storage.root), "--top", str(TOP), "--leaders", str(LEADERS),
            "--examples", str(EXAMPLES), "--context", str(CONTEXT), "--bins", str(BINS),
            "--neighbours", str(NEIGHBOURS), "--logit-tokens", str(LOGITS), "--quiet", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory, micro_model_dir, corpus_file):
    root = tmp_path_factory.mktemp("site") / "s"
    storage = build_warehouse(root, micro_model_dir, corpus_file)
    assert nwh(*site_args(storage, "--neuron", "masks:1/3")) == 0
    return storage, micro_model_dir


# -- reading the tables and arrays directly


def table(storage: Storage, name: str, run: str | None = None) -> pl.DataFrame:
    parts = sorted(storage.table_dir(name).glob("run_id=*/*.parquet"))
    frames = [pl.read_parquet(p).with_columns(pl.lit(p.parent.name[7:]).alias("run_id"))
              for p in parts]
    frame = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    return frame.filter(pl.col("run_id") == run) if run is not None else frame


def group(storage: Storage, run: str):
    return zarr.open_group(str(storage.arrays(run)), mode="r")


def masks(storage: Storage, run: str, layer: int, width: int) -> np.ndarray:
    packed = np.asarray(group(storage, run)[f"active/L{layer}"][:])
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :width].astype(bool)


def site(storage: Storage) -> Path:
    return storage.reports("site")


def read(storage: Storage, rel: str) -> str:
    return (site(storage) / rel).read_text()


class Doc(HTMLParser):
    """Elements with their attributes and text, flat: enough to find data-value cells."""

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[dict] = []
        self.elements: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self.stack)}
        self.elements.append(node)
        if tag not in ("img", "br", "meta", "link", "input", "circle", "line", "rect"):
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack:
            node = self.stack.pop()
            if node["tag"] == tag:
                break

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data

    def find(self, tag: str | None = None, **attrs) -> list[dict]:
        out = []
        for e in self.elements:
            if tag and e["tag"] != tag:
                continue
            if all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(e)
        return out

    def inside(self, tag: str, **attrs):
        """Elements within the first element matching tag/attrs."""
        (outer,) = self.find(tag, **attrs)[:1]
        return [e for e in self.elements if any(p is outer for p in e["parents"])]


def values(elements) -> list[float]:
    return [float(e["attrs"]["data-value"]) for e in elements if "data-value" in e["attrs"]]


def neuron_page(storage, run, layer, neuron) -> Doc:
    return Doc(read(storage, f"neurons/{run}/L{layer}_N{neuron}.html"))


def pages_of(storage: Storage, run: str) -> set[tuple[int, int]]:
    return {tuple(int(x) for x in re.fullmatch(r"L(\d+)_N(\d+)", p.stem).groups())
            for p in (site(storage) / "neurons" / run).glob("*.html")}


def stats_frame(storage: Storage, run: str) -> pl.DataFrame:
    return table(storage, "neuron_stats", run).with_columns(
        (pl.col("active_count") / pl.col("count")).alias("frequency"))


# -- which neurons get pages


def test_pages_are_the_top_by_score_plus_leaders_and_asked(built):
    storage, _ = built
    stats = stats_frame(storage, "dense").sort(["frequency", "neuron_id"],
                                               descending=[True, False])
    want = {(r["layer"], r["neuron"]) for r in stats.head(TOP).iter_rows(named=True)}
    grads = table(storage, "neuron_gradients", "grads").filter(pl.col("kind") == "neuron")
    top_g = grads.sort(["grad_mean_abs", "neuron_id"], descending=[True, False]).head(LEADERS)
    want |= {(r["layer"], r["neuron_id"] - r["layer"] * 40) for r in top_g.iter_rows(named=True)}
    uni = table(storage, "universal_neurons", "uni").sort(["excess", "neuron_id"],
                                                          descending=[True, False])
    want |= {(r["layer"], r["neuron"]) for r in uni.head(LEADERS).iter_rows(named=True)}
    subsets = table(storage, "subsets", "dense").filter(pl.col("rank") <= LEADERS)
    want |= {(r["layer"], r["neuron"]) for r in subsets.iter_rows(named=True)}
    assert pages_of(storage, "dense") == want
    masks_top = stats_frame(storage, "masks").sort(["frequency", "neuron_id"],
                                                   descending=[True, False]).head(TOP)
    assert pages_of(storage, "masks") == {(r["layer"], r["neuron"]) for r in
                                          masks_top.iter_rows(named=True)} | {(1, 3)}
    listed = Doc(read(storage, "runs/dense.html")).find("tr")
    ranked = [(int(e["attrs"]["data-layer"]), int(e["attrs"]["data-neuron"])) for e in listed
              if "data-neuron" in e["attrs"]]
    assert ranked[:TOP] == [(r["layer"], r["neuron"]) for r in stats.head(TOP).iter_rows(named=True)]


# -- the index


def test_index_lists_runs_and_token_counts(built):
    storage, _ = built
    doc = Doc(read(storage, "index.html"))
    tokens = table(storage, "tokens")
    runs = doc.inside("table", **{"class": "runs"})
    for run in ("dense", "masks", "gated"):
        (row,) = [e for e in runs if e["tag"] == "tr" and e["attrs"].get("data-run") == run]
        cells = [e for e in doc.elements if row in e["parents"] and e["tag"] == "td"]
        assert int(cells[4]["attrs"]["data-value"]) == tokens.filter(pl.col("run_id") == run).height
    (total,) = doc.find("b", **{"class": "total-rows"})
    assert int(total["attrs"]["data-value"]) == tokens.height


def test_index_dormancy_grid_is_the_dormancy_table(built):
    storage, _ = built
    dormancy = table(storage, "dormancy")
    layer_col = "layer" if "layer" in dormancy.columns else "layer_index"
    doc = Doc(read(storage, "index.html"))
    grid = [e for e in doc.find("table") if e["attrs"].get("class") == "dormancy-grid"]
    assert grid
    got = {}
    for tr in (e for e in doc.elements if e["tag"] == "tr" and grid[0] in e["parents"]
               and "data-layer" in e["attrs"]):
        cells = [e for e in doc.elements if tr in e["parents"] and e["tag"] == "td"][1:]
        got[int(tr["attrs"]["data-layer"])] = values(cells)
    # both runs share the model and the definition: one grid, checkpoints in run order
    for layer, row in got.items():
        want = [dormancy.filter((pl.col("run_id") == run) & (pl.col(layer_col) == layer))
                ["pct_dormant"][0] for run in ("dense", "masks")]
        assert sorted(row) == pytest.approx(sorted(want))


def test_index_ablation_p_values_against_controls(built):
    storage, _ = built
    effects = table(storage, "ablation_effects", "dense")
    doc = Doc(read(storage, "index.html"))
    subsets = effects.filter(pl.col("kind") == "subset")
    assert subsets.height >= 2
    for sub in subsets.iter_rows(named=True):
        ctrl = effects.filter((pl.col("subset") == sub["subset"]) & (pl.col("kind") == "control"))
        kl = ctrl["kl"].to_numpy()
        dl = ctrl["delta_loss"].to_numpy()
        rows = doc.find("tr", data_subset=sub["subset"], data_mode="zero")
        cells = [e for e in doc.elements if rows[0] in e["parents"] and e["tag"] == "td"]
        nums = {i: float(c["attrs"]["data-value"]) for i, c in enumerate(cells)
                if "data-value" in c["attrs"]}
        assert nums[2] == pytest.approx(sub["kl"])
        assert nums[4] == pytest.approx(((kl >= sub["kl"]).sum() + 1) / (len(kl) + 1))
        assert nums[7] == pytest.approx(((dl >= sub["delta_loss"]).sum() + 1) / (len(dl) + 1))
        assert f"{kl.mean():.3g}" in cells[3]["text"] and f"{kl.std():.3g}" in cells[3]["text"]


def test_index_universal_count_and_largest_excess(built):
    storage, _ = built
    uni = table(storage, "universal_neurons", "uni")
    doc = Doc(read(storage, "index.html"))
    count = doc.find("b", **{"class": "universal-count"})[0]
    assert int(count["attrs"]["data-value"]) == int(uni["universal"].sum())
    best = doc.find("span", **{"class": "max-excess"})[0]
    assert float(best["attrs"]["data-value"]) == pytest.approx(uni["excess"].max())
    top = uni.sort("excess", descending=True).row(0, named=True)
    assert f"L{top['layer']}/{top['neuron']}" in read(storage, "index.html")
    if not uni["universal"].any():
        assert "No</b> universal neuron at 0.5" in read(storage, "index.html")


def test_index_gradient_leaders(built):
    storage, _ = built
    grads = table(storage, "neuron_gradients", "grads").filter(pl.col("kind") == "neuron")
    want = grads.sort(["grad_mean_abs", "neuron_id"], descending=[True, False]).head(10)
    doc = Doc(read(storage, "index.html"))
    rows = [e for e in doc.find("tr") if "data-neuron-id" in e["attrs"]]
    assert [int(e["attrs"]["data-neuron-id"]) for e in rows] == want["neuron_id"].to_list()


# -- a neuron page


def dense_neuron(storage):
    stats = stats_frame(storage, "dense").sort(["frequency", "neuron_id"],
                                               descending=[True, False])
    r = stats.row(0, named=True)
    return r["layer"], r["neuron"]


def test_examples_are_the_largest_activations_with_context(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    acts = np.asarray(group(storage, "dense")[f"acts/L{layer}"][:, n], dtype=np.float64)
    tokens = table(storage, "tokens", "dense").sort("row")
    included = tokens["included"].to_numpy()
    rows = np.flatnonzero(included)
    order = rows[np.lexsort((rows, -acts[rows]))][:EXAMPLES]
    examples = doc.find("tr", **{"class": "example"})
    assert [int(e["attrs"]["data-row"]) for e in examples] == order.tolist()
    assert values(examples) == pytest.approx(acts[order].tolist())
    sample, position, text = (tokens[c].to_list() for c in ("sample", "position", "token"))
    for ex, row in zip(examples, order):
        want = "".join(t for s, p, t in zip(sample, position, text) if s == sample[row]
                       and position[row] - CONTEXT <= p <= position[row] + 4)
        (ctx,) = [e for e in doc.elements if ex in e["parents"] and e["tag"] == "td"
                  and e["attrs"].get("class") == "context"]
        assert ctx["text"] == want.replace("\n", "↵").replace("\t", "⇥")
        spans = [e for e in doc.elements if ex in e["parents"] and e["tag"] == "span"]
        window = [r for r, (s, p) in enumerate(zip(sample, position)) if s == sample[row]
                  and position[row] - CONTEXT <= p <= position[row] + 4]
        assert values(spans) == pytest.approx(acts[window].tolist())


def test_histogram_and_frequency(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    stats = table(storage, "neuron_stats", "dense").filter(
        (pl.col("layer") == layer) & (pl.col("neuron") == n)).row(0, named=True)
    (freq,) = doc.find("span", **{"class": "frequency"})
    assert float(freq["attrs"]["data-value"]) == pytest.approx(stats["active_count"] / stats["count"])
    acts = np.asarray(group(storage, "dense")[f"acts/L{layer}"][:, n], dtype=np.float64)
    included = table(storage, "tokens", "dense").sort("row")["included"].to_numpy()
    edges = np.linspace(stats["min"], stats["max"], BINS + 1)
    want = np.histogram(np.clip(acts[included], edges[0], edges[-1]), edges)[0]
    (svg,) = [e for e in doc.find("svg") if "data-counts" in e["attrs"]]
    assert [int(c) for c in svg["attrs"]["data-counts"].split(",")] == want.tolist()


def test_logit_effects_are_w_out_times_unembedding(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage, model_dir = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    w_out = model.transformer.h[layer].mlp.c_proj.weight.detach().numpy()  # Conv1D [d_mlp, d]
    effect = w_out[n].astype(np.float64) @ model.lm_head.weight.detach().numpy().T.astype(np.float64)
    order = np.argsort(-effect, kind="stable")
    for kind, ids in (("top", order[:LOGITS]), ("bottom", order[::-1][:LOGITS])):
        (tbl,) = doc.find("table", data_kind=kind)
        cells = [e for e in doc.elements if tbl in e["parents"] and e["tag"] == "td"]
        assert values(cells) == pytest.approx(effect[ids].tolist(), rel=1e-4, abs=1e-6)
        shown = [c["text"] for c in cells if "tokcell" in c["attrs"].get("class", "")]
        assert shown == [tok.decode([int(i)]).replace("\n", "↵").replace("\t", "⇥") for i in ids]


def test_neighbours_are_jaccard_of_mask_products(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    included = table(storage, "tokens", "dense").sort("row")["included"].to_numpy()
    me = masks(storage, "dense", layer, 40)[included, n].astype(np.int64)
    for other in (layer - 1, layer + 1):
        if not 0 <= other < 3:
            assert not doc.find("table", data_layer=str(other))
            continue
        theirs = masks(storage, "dense", other, 40)[included].astype(np.int64)
        both = me @ theirs
        union = me.sum() + theirs.sum(0) - both
        jac = np.where(both > 0, both / np.maximum(union, 1), 0.0)
        top = [t for t in np.lexsort((np.arange(40), -jac))[:NEIGHBOURS] if both[t] > 0]
        (tbl,) = doc.find("table", data_layer=str(other))
        rows = [e for e in doc.elements if tbl in e["parents"] and e["tag"] == "tr"
                and "data-neuron" in e["attrs"]]
        assert [int(r["attrs"]["data-neuron"]) for r in rows] == top
        cells = [e for e in doc.elements if tbl in e["parents"] and e["tag"] == "td"]
        assert values(cells) == pytest.approx([x for t in top for x in (both[t], jac[t])])


def test_correlated_neurons_are_the_stored_blocks_and_summary(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    corr = group(storage, "uni")["corr/m1"]
    cands = []
    for b in range(3):
        row = np.asarray(corr[f"L{layer}_L{b}"][n, :], dtype=np.float64)
        cands += [(row[t], b, t) for t in range(len(row))]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    (tbl,) = [t for t in doc.find("table") if t["attrs"].get("class") == "correlated"]
    rows = [e for e in doc.elements if tbl in e["parents"] and "data-neuron" in e["attrs"]]
    assert [(int(r["attrs"]["data-layer"]), int(r["attrs"]["data-neuron"])) for r in rows] == \
        [(b, t) for _, b, t in cands[:NEIGHBOURS]]
    summary = table(storage, "correlation_summary", "uni").filter(
        (pl.col("layer") == layer) & (pl.col("neuron") == n)).row(0, named=True)
    (srow,) = [e for e in doc.find("tr") if "data-model" in e["attrs"]]
    cells = [e for e in doc.elements if srow in e["parents"] and e["tag"] == "td"]
    assert values(cells) == pytest.approx([summary["max_corr"], summary["baseline_max"],
                                           summary["excess"]])
    assert cands[0][0] == pytest.approx(summary["max_corr"], abs=1e-6)


def test_dormancy_over_runs_of_the_model(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    for run in ("dense", "masks"):
        stats = table(storage, "neuron_stats", run).filter(pl.col("layer") == layer).sort("neuron")
        mean_abs = (stats["sum_abs"] / stats["count"]).to_numpy()
        want = mean_abs[n] / (mean_abs.mean() + 1e-9)
        (tr,) = doc.find("tr", data_run=run)
        cells = [e for e in doc.elements if tr in e["parents"] and e["tag"] == "td"]
        assert values(cells)[0] == pytest.approx(want)
        assert cells[3]["text"] == ("dormant" if want <= 0.2 else "alive")


def test_gradient_rank(built):
    storage, _ = built
    layer, n = dense_neuron(storage)
    doc = neuron_page(storage, "dense", layer, n)
    grads = table(storage, "neuron_gradients", "grads").filter(pl.col("kind") == "neuron")
    order = grads.sort(["grad_mean_abs", "neuron_id"], descending=[True, False])["neuron_id"]
    nid = layer * 40 + n
    (rank,) = doc.find("b", **{"class": "grad-rank"})
    assert int(rank["attrs"]["data-value"]) == order.to_list().index(nid) + 1
    mine = grads.filter(pl.col("neuron_id") == nid).row(0, named=True)
    (g,) = doc.find("span", data_name="grad_mean_abs")
    assert float(g["attrs"]["data-value"]) == pytest.approx(mine["grad_mean_abs"])


def test_masks_only_examples_are_active_rows(built):
    storage, _ = built
    doc = neuron_page(storage, "masks", 1, 3)
    bits = masks(storage, "masks", 1, 40)[:, 3]
    rows = [int(e["attrs"]["data-row"]) for e in doc.find("tr", **{"class": "example"})]
    assert rows and all(bits[r] for r in rows)
    assert rows == sorted(rows) and len(rows) == min(EXAMPLES, int(bits.sum()))
    assert "--store-acts" in read(storage, "neurons/masks/L1_N3.html")
    assert "has no co-activation counts" in read(storage, "neurons/masks/L1_N3.html")
    assert "nwh coactivation --run masks" in read(storage, "neurons/masks/L1_N3.html")


def test_gated_neuron_has_sign_shares_and_examples(built):
    storage, _ = built
    layer, n = sorted(pages_of(storage, "gated"))[0]
    doc = neuron_page(storage, "gated", layer, n)
    signs = table(storage, "sign_stats", "gated").filter(
        (pl.col("layer") == layer) & (pl.col("neuron") == n))
    total = signs["count"].sum()
    for r in signs.iter_rows(named=True):
        (tr,) = doc.find("tr", data_combination=r["combination"])
        cells = [e for e in doc.elements if tr in e["parents"] and e["tag"] == "td"]
        assert values(cells)[:2] == pytest.approx([r["count"] / total, r["count"]])
    examples = table(storage, "sign_examples", "gated").filter(
        (pl.col("layer") == layer) & (pl.col("neuron") == n))
    listed = [(int(e["attrs"]["data-row"]), float(e["attrs"]["data-value"]))
              for e in doc.find("li") if "data-row" in e["attrs"]]
    want = [(r["row"], r["value"]) for r in examples.sort(["combination", "rank"])
            .iter_rows(named=True)]
    assert [r for r, _ in listed] == [r for r, _ in want]
    assert [v for _, v in listed] == pytest.approx([v for _, v in want], rel=1e-6)


# -- graph page and search data


def test_graph_nodes_are_the_active_bits_and_edges_the_strongest(built):
    storage, _ = built
    doc = Doc(read(storage, "graphs/dense.html"))
    (blob,) = doc.find("script", id="graph-data")
    data = json.loads(blob["text"])
    included = table(storage, "tokens", "dense").sort("row")["included"].to_numpy()
    bits = [masks(storage, "dense", l, 40) for l in range(3)]
    active = [b[included].sum(0) for b in bits]
    for g in data["graphs"]:
        row = g["row"]
        for layer in g["layers"]:
            assert [n for n, _ in layer["nodes"]] == np.flatnonzero(bits[layer["layer"]][row]).tolist()
        cands = []
        for a in range(2):
            both = bits[a][included].T.astype(np.int64) @ bits[a + 1][included].astype(np.int64)
            for i in np.flatnonzero(bits[a][row]):
                for j in np.flatnonzero(bits[a + 1][row]):
                    if both[i, j]:
                        cands.append((both[i, j] / (active[a][i] + active[a + 1][j] - both[i, j]),
                                      a, i, j))
        cands.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
        want = cands[:300]
        assert [(e[0], e[1], e[3]) for e in g["edges"]] == [(a, i, j) for _, a, i, j in want]
        assert [e[4] for e in g["edges"]] == pytest.approx([w for w, *_ in want], abs=1e-5)


def test_search_index_counts_tokens(built):
    storage, _ = built
    text = read(storage, "data/search.js")
    data = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
    tokens = table(storage, "tokens", "dense").sort("row")
    included = tokens["included"].to_numpy()
    ids = tokens["token_id"].to_numpy()
    words = tokens["token"].to_list()
    checked = 0
    for word, entries in data["tokens"]["dense"].items():
        token_rows = np.array([w == word for w in words]) & included
        for layer, n, p_tok, p_all, hits, count in entries:
            bits = masks(storage, "dense", layer, 40)[:, n]
            assert count == token_rows.sum() or len(set(ids[token_rows])) > 1
            assert hits == int((bits & token_rows).sum())
            assert p_tok == pytest.approx(hits / count, abs=1e-4)
            assert p_all == pytest.approx(bits[included].mean(), abs=1e-4)
            checked += 1
    assert checked > 0
    assert data["runs"]["masks"]["pages"]["1/3"] == "neurons/masks/L1_N3.html"


def test_every_link_and_image_resolves(built):
    storage, _ = built
    root = site(storage)
    pages = list(root.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        for ref in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            if ref.startswith(("data:", "#", "http")):
                continue
            target = (page.parent / ref.split("#")[0]).resolve()
            assert target.exists(), f"{page.relative_to(root)} -> {ref}"
    for png in root.glob("figures/*.png"):
        assert png.stat().st_size > 1000


# -- on demand, kept, forgotten; bad input


def test_asked_neuron_pages_are_kept_then_forgotten(built):
    storage, _ = built
    assert nwh(*site_args(storage)) == 0
    assert (site(storage) / "neurons/masks/L1_N3.html").exists()
    assert nwh(*site_args(storage, "--fresh")) == 0
    assert not (site(storage) / "neurons/masks/L1_N3.html").exists()
    assert nwh(*site_args(storage, "--neuron", "masks:1/3")) == 0


@pytest.mark.parametrize("argv,needle", [
    (["--neuron", "dense:2/40"], "out of range"),
    (["--neuron", "dense:7/1"], "out of range"),
    (["--neuron", "nope:1/1"], "not a finished extraction"),
    (["--neuron", "dense-2-3"], "malformed"),
    (["--graph", "masks"], "nwh coactivation --run masks"),
    (["--graph", "dense:100000"], "out of range"),
    (["--runs", "nope"], "not a finished extraction"),
    (["--bins", "1"], "--bins"),
])
def test_bad_input_is_one_line_and_writes_nothing(built, capsys, argv, needle):
    storage, _ = built
    before = files_of(storage.root)
    assert nwh("site", "--storage", str(storage.root), "--quiet", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert files_of(storage.root) == before


def test_a_folder_that_is_not_a_site_is_never_replaced(built, capsys):
    storage, _ = built
    figure = storage.reports("dense") / "mine.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_bytes(b"not really a png")
    assert nwh("site", "--storage", str(storage.root), "--name", "dense", "--quiet") == 2
    assert "not a site" in capsys.readouterr().err and figure.read_bytes() == b"not really a png"


def test_missing_tables_say_which_command_makes_them(tmp_path, micro_model_dir, corpus_file,
                                                     capsys):
    storage = build_warehouse(tmp_path / "s", micro_model_dir, corpus_file, full=False)
    assert nwh("site", "--storage", str(storage.root), "--top", "2", "--quiet") == 0
    out = capsys.readouterr().out
    assert "site: " in out and "file://" in out
    index = read(storage, "index.html")
    for command in ("nwh dormancy --run", "nwh subset-grid --run RUN", "nwh universal --models",
                    "nwh gradients --model"):
        assert command in index, command
    assert "nwh universal --models" in read(storage, "universal.html")
    for argv, needle in ((["--score", "excess"], "nwh universal"),
                         (["--score", "gradient"], "nwh gradients")):
        assert nwh("site", "--storage", str(storage.root), "--quiet", *argv) == 2
        assert needle in capsys.readouterr().err
    empty = Storage(tmp_path / "empty")
    (empty.root / "tables").mkdir(parents=True)
    assert nwh("site", "--storage", str(empty.root), "--quiet") == 2
    assert "no finished extraction run" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "s-llama", ignore_errors=True)
