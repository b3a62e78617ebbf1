"""Building the site: which neurons get pages, the data of each page, and the files written.

Layout of storage/reports/<name>/ (every link relative, so the folder opens from disk):
    index.html                      runs, models, tokens, headline numbers, search
    runs/<run>.html                 a run: layers, its neuron pages, sample maps
    neurons/<run>/L<l>_N<n>.html    a neuron: examples first, then everything else known of it
    graphs/<run>.html               layered graph of token rows (needs co-activation counts)
    dormancy.html subsets.html ablation.html universal.html gradients.html
    figures/*.png                   the large figures of those pages
    data/search.js                  the search index (a script, not JSON: file:// forbids fetch)
    assets/                         site.css, site.js, panzoom.min.js and its licence
    site.json                       what was built, and the --neuron pages to keep next time
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.layers import check_neuron
from pipeline.core.storage import Storage, read_json, write_json
from pipeline.report.site import data as D
from pipeline.report.site import pages as P
from pipeline.report.site.pages import cell, esc, fmt, link, missing, pct, table

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent / "assets"
SCORE_COLUMNS = {"frequency": "frequency", "mean": "mean", "max": "max", "excess": "excess",
                 "gradient": "gradient"}
SCORE_HELP = {"frequency": "share of rows where active", "mean": "mean activation",
              "max": "largest activation", "excess": "excess correlation across models",
              "gradient": "mean |dL/da|"}
LEADERS = 10           # rows of the index's leader tables
PAGE_TABLE_ROWS = 20   # members / neurons listed per subset or result on the big pages


@dataclass(frozen=True)
class NeuronKey:
    run: str
    layer: int
    neuron: int

    @property
    def spec(self) -> str:
        return f"{self.run}:{self.layer}/{self.neuron}"

    @property
    def path(self) -> str:
        return f"neurons/{self.run}/L{self.layer}_N{self.neuron}.html"


def parse_neuron(spec: str) -> tuple[str, int, int]:
    """RUN:L/n -> (run, layer, neuron); a malformed spec is a one-line UserError."""
    run, sep, rest = spec.rpartition(":")
    layer, slash, neuron = rest.partition("/")
    try:
        if not sep or not slash or not run:
            raise ValueError
        return run, int(layer.lstrip("Ll")), int(neuron.lstrip("Nn"))
    except ValueError:
        raise UserError(f"--neuron {spec!r} is malformed: write RUN:LAYER/NEURON, e.g. "
                        "demo-corpus:2/17") from None


def parse_graph(spec: str) -> tuple[str, int | None]:
    run, sep, row = spec.rpartition(":")
    if not sep:
        return spec, None
    try:
        return run, int(row)
    except ValueError:
        raise UserError(f"--graph {spec!r} is malformed: write RUN or RUN:ROW, e.g. "
                        "demo-corpus:120") from None


def neuron_key(infos: dict[str, D.RunInfo], storage: Storage, spec: str) -> NeuronKey:
    run, layer, neuron = parse_neuron(spec)
    if run not in infos:
        known = ", ".join(infos) or "none"
        raise UserError(f"--neuron {spec!r}: run {run!r} is not a finished extraction in "
                        f"{storage.root} (runs: {known})")
    check_neuron(infos[run].widths, layer, neuron, f"run {run!r}", flag="--neuron ")
    return NeuronKey(run, layer, neuron)


def no_counts(run: str) -> UserError:
    return UserError(f"run {run!r} has no co-activation counts, which its layered graph needs: "
                     f"run `nwh coactivation --run {run}`")


# -- the plan: runs, pages, graphs


@dataclass
class Plan:
    infos: dict[str, D.RunInfo]
    page_runs: list[str]                                 # runs with run pages
    pages: dict[str, list[NeuronKey]]                    # run -> its neuron pages, ranked
    extras: list[NeuronKey]                              # --neuron pages (kept next time)
    graphs: dict[str, list[int] | None]                  # run -> rows (None: default rows)
    scores: dict[str, pl.DataFrame]                      # run -> sql/site_neuron_scores.sql
    universal: dict[str, D.UniversalResult]              # run -> its universal result
    gradients: dict[str, str]                            # run -> its gradient result
    notes: dict[str, str] = field(default_factory=dict)  # run -> why it has no top pages

    def has_page(self, run: str, layer: int, neuron: int) -> bool:
        return NeuronKey(run, layer, neuron) in self._set

    def __post_init__(self) -> None:
        self._set = {k for keys in self.pages.values() for k in keys}


def make_plan(config, storage: Storage, wh: D.Warehouse, out: Path) -> Plan:
    runs = wh.frame("site_runs")
    infos = D.run_infos(storage, runs)
    if not infos:
        raise UserError(f"the warehouse at {storage.root} has no finished extraction run: "
                        "extract one first, e.g. `nwh extract --model zoo-s0`")
    for run in config.runs:
        if run not in infos:
            raise UserError(f"--runs: {run!r} is not a finished extraction in {storage.root} "
                            f"(runs: {', '.join(infos)})")
    page_runs = list(config.runs) or list(infos)
    asked = [neuron_key(infos, storage, s) for s in config.neuron]
    kept = [] if config.fresh else _kept_neurons(out, infos, storage)
    extras = list(dict.fromkeys(kept + asked))
    for key in extras:
        if key.run not in page_runs:
            page_runs.append(key.run)
    graphs: dict[str, list[int] | None] = {}
    for spec in config.graph:
        run, row = parse_graph(spec)
        if run not in infos:
            raise UserError(f"--graph {spec!r}: run {run!r} is not a finished extraction in "
                            f"{storage.root} (runs: {', '.join(infos)})")
        if not infos[run].pairs:
            raise no_counts(run)
        rows = infos[run].row["num_rows"]
        if row is not None and not 0 <= row < rows:
            raise UserError(f"--graph {spec!r}: row {row} is out of range: run {run!r} has rows "
                            f"0-{rows - 1}")
        if row is None:
            graphs.setdefault(run, None)
        else:
            graphs[run] = (graphs.get(run) or []) + [row]
        if run not in page_runs:
            page_runs.append(run)
    if not config.graph:
        graphs = {run: None for run in page_runs if infos[run].pairs}
    uni_results = D.universal_results(storage, wh.frame("site_universal"))
    grad_results = wh.frame("site_gradient_results")
    universal = {run: r for run in page_runs for r in uni_results if r.matches(infos[run])}
    gradients = {run: g for run in page_runs
                 if (g := D.gradient_result_for(grad_results, infos[run])) is not None}
    column = SCORE_COLUMNS[config.score]
    if config.top and config.score == "excess" and not universal:
        models = sorted({infos[r].model for r in page_runs})
        raise UserError(f"--score excess: no universal result compares the model(s) "
                        f"{', '.join(models)} of these runs with others: run `nwh universal "
                        f"--models {models[0]} OTHER...`, or pick another --score")
    if config.top and config.score == "gradient" and not gradients:
        models = sorted({infos[r].model for r in page_runs})
        raise UserError(f"--score gradient: no neuron gradients of the model(s) "
                        f"{', '.join(models)} at these runs' revisions: run `nwh gradients "
                        f"--model {models[0]}`, or pick another --score")
    scores, pages, notes = {}, {}, {}
    for run in page_runs:
        frame = wh.frame("site_neuron_scores", run_id=run,
                         universal=universal[run].name if run in universal else None,
                         gradients=gradients.get(run))
        scores[run] = frame
        ranked = frame.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan()) \
            .sort([column, "neuron_id"], descending=[True, False])
        if config.top and not ranked.height:
            notes[run] = f"no neuron of this run has a {config.score} score"
        top = [NeuronKey(run, int(l), int(n)) for l, n in
               zip(ranked["layer"].head(config.top), ranked["neuron"].head(config.top))]
        pages[run] = list(dict.fromkeys(top + [k for k in extras if k.run == run]))
    for run, keys in _leaders(config, wh, page_runs, scores, universal, gradients).items():
        pages[run] = list(dict.fromkeys(pages[run] + keys))
    return Plan(infos, page_runs, pages, extras, graphs, scores, universal, gradients, notes)


def _leaders(config, wh: D.Warehouse, page_runs: list[str], scores: dict[str, pl.DataFrame],
             universal: dict, gradients: dict) -> dict[str, list[NeuronKey]]:
    """Pages for the neurons the index and the big pages name: the --leaders largest by
    gradient and by excess (in the first page run of each result), and the --leaders most
    central of each subset."""
    n = config.leaders
    out: dict[str, list[NeuronKey]] = {}
    if n <= 0:
        return out
    done: set[tuple[str, str]] = set()
    for run in page_runs:
        for kind, result in (("gradient", gradients.get(run)),
                             ("excess", universal[run].name if run in universal else None)):
            if result is None or (kind, result) in done:
                continue
            done.add((kind, result))
            top = scores[run].filter(pl.col(kind).is_not_null() & pl.col(kind).is_not_nan()) \
                .sort([kind, "neuron_id"], descending=[True, False]).head(n)
            out.setdefault(run, []).extend(NeuronKey(run, int(l), int(k)) for l, k in
                                           zip(top["layer"], top["neuron"]))
    members = wh.frame("site_subset_members").filter(pl.col("run_id").is_in(page_runs)
                                                     & (pl.col("rank") <= n))
    for run, layer, neuron in zip(members["run_id"], members["layer"], members["neuron"]):
        out.setdefault(run, []).append(NeuronKey(run, int(layer), int(neuron)))
    return out


def _kept_neurons(out: Path, infos, storage) -> list[NeuronKey]:
    """The --neuron pages of the last build that still name a neuron of the warehouse."""
    path = out / "site.json"
    if not path.exists():
        return []
    kept = []
    for spec in read_json(path).get("neurons", []):
        try:
            kept.append(neuron_key(infos, storage, spec))
        except UserError:
            log.info("the page of %s is dropped: the warehouse no longer has it", spec)
    return kept


# -- building


@dataclass
class Built:
    index: Path
    neuron_pages: int
    runs: list[str]
    graphs: list[str]
    pages: list[str]    # every page written, relative to the site folder


class SiteBuilder:
    """Writes every page of a plan into a folder (the caller renames it into place)."""

    def __init__(self, config, storage: Storage, wh: D.Warehouse, plan: Plan, folder: Path,
                 final: Path):
        self.config, self.storage, self.wh, self.plan = config, storage, wh, plan
        self.folder, self.final = folder, final
        self.figures = folder / "figures"
        self.written: list[str] = []
        self.nav = P.Nav([("index.html", "Index"), ("index.html#search", "Search"),
                          ("dormancy.html", "Dormancy"), ("subsets.html", "Subsets"),
                          ("ablation.html", "Ablation"), ("universal.html", "Universal"),
                          ("gradients.html", "Gradients")])
        self.search_tokens: dict[str, dict] = {}
        self.models: dict = {}  # loaded models by folder, for W_out . W_U
        self.graph_runs: list[str] = []

    # -- helpers

    def write(self, rel: str, text: str) -> None:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.written.append(rel)

    def href(self, rel: str, depth: int) -> str:
        return "../" * depth + rel

    def neuron_href(self, run: str, layer: int, neuron: int, depth: int) -> str | None:
        if self.plan.has_page(run, layer, neuron):
            return self.href(NeuronKey(run, layer, neuron).path, depth)
        return None

    def neuron_link(self, run: str, layer: int, neuron: int, depth: int, text: str | None = None
                    ) -> str:
        text = text or f"L{layer}/{neuron}"
        href = self.neuron_href(run, layer, neuron, depth)
        if href:
            return link(href, text)
        return (f'<span class="nopage" title="no page yet: nwh site --neuron '
                f'{esc(run)}:{layer}/{neuron}">{esc(text)}</span>')

    def run_link(self, run: str, depth: int) -> str:
        return link(self.href(f"runs/{run}.html", depth), run) if run in self.plan.page_runs \
            else esc(run)

    def page(self, rel: str, title: str, body: str, **kw) -> None:
        depth = rel.count("/")
        self.write(rel, P.page(title, body, depth=depth, nav=self.nav, **kw))

    # -- the whole site

    def build(self, progress: bool = True) -> Built:
        from tqdm import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ASSET_DIR, self.folder / "assets", dirs_exist_ok=True)
        self.figures.mkdir(exist_ok=True)
        total = sum(len(v) for v in self.plan.pages.values())
        bar = tqdm(total=total, desc="neuron pages", unit="page", disable=not progress)
        for run in self.plan.page_runs:
            self.run_pages(run, bar)
        bar.close()
        self.dormancy_page()
        self.subsets_page()
        self.ablation_page()
        self.universal_page()
        self.gradients_page()
        self.index_page()
        self.search_data()
        write_json(self.folder / "site.json", {
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "storage": str(self.storage.root), "score": self.config.score,
            "top": self.config.top, "neurons": [k.spec for k in self.plan.extras],
            "pages": sorted(self.written)})
        return Built(self.final / "index.html", total, list(self.plan.page_runs),
                     list(self.graph_runs), sorted(self.written))

    # -- one run: its neuron pages, run page, graph page, token index

    def run_pages(self, run: str, bar) -> None:
        info = self.plan.infos[run]
        tokens = D.run_tokens(self.wh, run)
        scores = self.plan.scores[run]
        keys = self.plan.pages[run]
        wanted: dict[int, list[int]] = {}
        for k in keys:
            wanted.setdefault(k.layer, []).append(k.neuron)
        ids = [info.neuron_id(k.layer, k.neuron) for k in keys]
        facts = NeuronFacts(self, info, tokens, scores, wanted, ids)
        for key, nid in zip(keys, ids):
            self.neuron_page(facts, key, nid)
            bar.update(1)
        frequency = {l: np.zeros(w) for l, w in info.widths.items()}
        for l, n, f in zip(scores["layer"], scores["neuron"], scores["frequency"]):
            frequency[l][n] = f
        found = D.token_neurons(self.storage, info, tokens, frequency,
                                top_tokens=self.config.token_index, per_token=8)
        self.search_tokens[run] = found
        rows = None
        if run in self.plan.graphs:
            rows = self.plan.graphs[run] or D.default_graph_rows(tokens)
            self.graph_page(info, tokens, rows)
        self.run_page(info, tokens, rows or D.default_graph_rows(tokens, 1))

    def neuron_page(self, facts: NeuronFacts, key: NeuronKey, nid: int) -> None:
        info = facts.info
        depth = 2
        row = facts.score_row(nid)
        arr = facts.arrays.get(nid)
        parts = [self._neuron_header(info, key, nid, row, facts)]
        parts.append(self._examples_section(info, key, arr))
        parts.append(self._distribution_section(info, row, arr))
        if info.gated:
            parts.append(self._sign_section(facts, key, nid, arr))
        parts.append(self._logit_section(facts, key))
        parts.append(self._neighbour_section(facts, key, depth))
        parts.append(self._correlation_section(facts, key, nid, depth))
        parts.append(self._dormancy_section(facts, key, nid))
        parts.append(self._gradient_section(facts, key, nid, row))
        self.page(key.path, f"Neuron L{key.layer}/{key.neuron} of {key.run}", "".join(parts))

    def _neuron_header(self, info, key, nid, row, facts) -> str:
        run_keys = self.plan.pages[key.run]
        k = run_keys.index(key)
        prev_l = self.neuron_link(key.run, run_keys[k - 1].layer, run_keys[k - 1].neuron, 2,
                                  "← previous") if k > 0 else ""
        next_l = self.neuron_link(key.run, run_keys[k + 1].layer, run_keys[k + 1].neuron, 2,
                                  "next →") if k + 1 < len(run_keys) else ""
        facts_row = [("run", self.run_link(key.run, 2)), ("model", esc(info.model)),
                     ("revision", esc(info.revision or "–")), ("neuron id", f"{nid:,}"),
                     ("layer", str(key.layer)), ("index in layer", str(key.neuron)),
                     ("active rule", esc(f"{info.rule} > {info.row['active_threshold']:g}"))]
        dl = "".join(f"<dt>{esc(a)}</dt><dd>{b}</dd>" for a, b in facts_row)
        return (f'<p class="pager">{prev_l} {next_l}</p><dl class="facts">{dl}</dl>'
                f'<div class="badges">{self._badges(row, facts, nid)}</div>')

    def _badges(self, row: dict | None, facts, nid: int) -> str:
        if row is None:
            return ""
        out = [("frequency", pct(row["frequency"]), row["frequency"]),
               ("mean activation", fmt(row["mean"]), row["mean"]),
               ("max activation", fmt(row["max"]), row["max"])]
        if row.get("excess") is not None:
            out.append(("excess correlation", fmt(row["excess"]), row["excess"]))
        if row.get("gradient") is not None:
            out.append(("mean |dL/da|", fmt(row["gradient"]), row["gradient"]))
        return "".join(f'<span class="badge" data-name="{esc(a)}" data-value="{esc(repr(v))}">'
                       f"<b>{esc(b)}</b> {esc(a)}</span>" for a, b, v in out)

    def _examples_section(self, info, key, arr: D.NeuronArrays | None) -> str:
        if arr is None or not arr.examples:
            return ('<section id="examples"><h2>Max-activating examples</h2>'
                    + missing("no token row activates this neuron") + "</section>")
        note = {
            "acts": f"The {len(arr.examples)} token rows of largest activation (included rows), "
                    "with the tokens around each shaded by this neuron's activation there.",
            "sign": "No dense activations are stored for this layer: the rows of largest "
                    "activation among the top-|a| rows of each sign combination (sign_examples); "
                    "only the example's own token has a value. Re-extract with --store-acts "
                    "to shade the context.",
            "mask": "No dense activations are stored for this layer: rows where the neuron is "
                    "active by the run's rule, spread over the run, unshaded. Re-extract with "
                    "--store-acts for the max-activating ones.",
        }[arr.source]
        scale = max((abs(v) for e in arr.examples for _, _, v in e.context if v is not None),
                    default=0.0)
        rows = []
        for rank, ex in enumerate(arr.examples, 1):
            value = "" if ex.value is None else f"{ex.value:.4g}"
            rows.append(f'<tr class="example" data-row="{ex.row}" '
                        f'data-value="{"" if ex.value is None else repr(ex.value)}">'
                        f'<td class="num">{rank}</td><td class="num">{value}</td>'
                        f'<td class="num">{ex.row}</td>'
                        f'<td class="context">{P.example_line(ex.context, ex.row, scale)}</td></tr>')
        legend = P.shading_legend(scale) if scale > 0 else ""
        return (f'<section id="examples"><h2>Max-activating examples</h2><p>{esc(note)}</p>'
                f"{legend}"
                + table(["#", "activation", "row", "context"], rows, cls="examples")
                + "</section>")

    def _distribution_section(self, info, row, arr) -> str:
        head = '<section id="distribution"><h2>Activation distribution</h2>'
        if row is None:
            return head + missing("this neuron has no neuron_stats row") + "</section>"
        text = (f'<p>Active (rule {esc(info.rule)}) in <b data-value="{row["active_count"]}">'
                f'{row["active_count"]:,}</b> of {row["count"]:,} accumulated rows '
                f'(<span class="frequency" data-value="{row["frequency"]!r}">'
                f'{pct(row["frequency"])}</span>); mean {fmt(row["mean"])}, mean |a| '
                f'{fmt(row["mean_abs"])}, range [{fmt(row["min"])}, {fmt(row["max"])}].</p>')
        if arr is not None and arr.hist_counts is not None:
            chart = P.svg_histogram(arr.hist_edges.tolist(), arr.hist_counts.tolist())
            text += f'<div class="histogram">{chart}</div>'
        else:
            text += missing("no histogram: the layer's dense activations are not stored",
                            f"nwh extract --run {info.run_id} --store-acts --overwrite ...")
        return head + text + "</section>"

    def _sign_section(self, facts, key, nid, arr) -> str:
        stats = facts.signs.filter(pl.col("neuron_id") == nid)
        head = ('<section id="signs"><h2>Sign combinations of gate and up</h2>'
                "<p>a = act(g) · u: each token falls in one of four combinations of the signs "
                "of the gate pre-activation g and the up projection u (GLUScope).</p>")
        if not stats.height:
            return head + missing("no sign_stats rows for this neuron",
                                  f"nwh extract ... --run {key.run}") + "</section>"
        rows = [f'<tr data-combination="{esc(r["combination"])}">'
                f'<td>{esc(r["combination"])}</td>{cell(r["share"], pct(r["share"]))}'
                f'{cell(int(r["count"]))}{cell(r["mean_abs"])}</tr>'
                for r in stats.iter_rows(named=True)]
        body = table(["combination", "share", "entries", "mean |a|"], rows, cls="signs")
        if arr is not None:
            scale = max((abs(v) for exs in arr.sign_examples.values() for e in exs
                         for _, _, v in e.context if v is not None), default=0.0)
            for comb, exs in arr.sign_examples.items():
                if not exs:
                    continue
                lines = "".join(f'<li data-row="{e.row}" data-value="{e.value!r}">'
                                f'<span class="num">{e.value:.4g}</span> '
                                f"{P.example_line(e.context, e.row, scale)}</li>" for e in exs)
                body += f'<h3>{esc(comb)}</h3><ol class="sign-examples">{lines}</ol>'
        return head + body + "</section>"

    def _logit_section(self, facts, key) -> str:
        head = ('<section id="logits"><h2>Promoted and suppressed tokens</h2>'
                "<p>W_out[n] · W_U: the neuron's direct effect on the logits (the final norm "
                "left out).</p>")
        eff = facts.logits
        if eff.reason or (key.layer, key.neuron) not in eff.top:
            return head + missing(eff.reason or "not computed") + "</section>"

        def rows(items):
            return [f'<tr><td class="tokcell">{P.token_span(t, None, 0)}</td>{cell(v)}</tr>'
                    for t, v in items]
        top = table(["promoted", "logit"], rows(eff.top[(key.layer, key.neuron)]),
                    cls="logits", attrs='data-kind="top"')
        bottom = table(["suppressed", "logit"], rows(eff.bottom[(key.layer, key.neuron)]),
                       cls="logits", attrs='data-kind="bottom"')
        return head + f'<div class="two">{top}{bottom}</div></section>'

    def _neighbour_section(self, facts, key, depth) -> str:
        head = ('<section id="neighbours"><h2>Co-activation neighbours</h2><p>Neurons of '
                "adjacent counted layers that fire on the same token rows, by Jaccard weight "
                "(rows where both fire / rows where either does).</p>")
        info = facts.info
        if not info.pairs:
            return head + missing("this run has no co-activation counts",
                                  f"nwh coactivation --run {info.run_id}") + "</section>"
        found = facts.neighbours.get((key.layer, key.neuron), [])
        if not found:
            return head + missing("no neuron fires together with this one in a counted pair"
                                  ) + "</section>"
        body = ""
        for layer in sorted({n.layer for n in found}):
            rows = [f'<tr data-layer="{n.layer}" data-neuron="{n.neuron}">'
                    f"<td>{self.neuron_link(info.run_id, n.layer, n.neuron, depth)}</td>"
                    f"{cell(n.count)}{cell(n.jaccard)}</tr>"
                    for n in found if n.layer == layer]
            side = "before" if layer < key.layer else "after"
            body += f"<h3>Layer {layer} ({side})</h3>" + table(
                ["neuron", "rows together", "Jaccard"], rows, cls="neighbours",
                attrs=f'data-layer="{layer}"')
        return head + body + "</section>"

    def _correlation_section(self, facts, key, nid, depth) -> str:
        head = ('<section id="correlated"><h2>Most correlated neurons in other models</h2>')
        result = self.plan.universal.get(key.run)
        if result is None:
            return head + missing(f"no universal result compares {facts.info.model} with other "
                                  "models", f"nwh universal --models {facts.info.model} OTHER"
                                  ) + "</section>"
        summary = facts.correlations_summary.filter(pl.col("neuron_id") == nid)
        body = (f"<p>From result {esc(result.name)}: Pearson r over the same token windows; "
                f"the baseline is the {esc(result.baseline)} baseline of "
                "<code>nwh universal</code>, its best r the one a neuron gets by chance.</p>")
        if summary.height:
            rows = [f'<tr data-model="{esc(r["model_b"])}"><td>{esc(r["model_b"])}</td>'
                    f'{cell(r["max_corr"])}<td>L{r["argmax_layer"]}/{r["argmax_neuron"]}</td>'
                    f'{cell(r["baseline_max"])}{cell(r["excess"])}</tr>'
                    for r in summary.iter_rows(named=True)]
            body += table(["model", "max r", "best match", "baseline max r", "excess"], rows,
                          cls="corr-summary")
        found = facts.correlated.get((key.layer, key.neuron), [])
        for model in dict.fromkeys(c.model for c in found):
            rows = []
            for c in (c for c in found if c.model == model):
                target = self._page_of_model(model, c.layer, c.neuron, depth)
                rows.append(f'<tr data-layer="{c.layer}" data-neuron="{c.neuron}">'
                            f"<td>{target}</td>{cell(c.r)}</tr>")
            body += f"<h3>{esc(model)}</h3>" + table(["neuron", "r"], rows, cls="correlated",
                                                     attrs=f'data-model="{esc(model)}"')
        if not found and not summary.height:
            body += missing("the result stored no correlation of this neuron")
        return head + body + "</section>"

    def _page_of_model(self, model: str, layer: int, neuron: int, depth: int) -> str:
        for run in self.plan.page_runs:
            if self.plan.infos[run].model == model and self.plan.has_page(run, layer, neuron):
                return link(self.href(NeuronKey(run, layer, neuron).path, depth),
                            f"L{layer}/{neuron}")
        return esc(f"L{layer}/{neuron}")

    def _dormancy_section(self, facts, key, nid) -> str:
        head = '<section id="dormancy"><h2>Dormancy over checkpoints</h2>'
        rows = facts.dormancy.filter(pl.col("neuron_id") == nid)
        if rows.height < 1:
            return head + missing("no run of this model has neuron_stats") + "</section>"
        tau = facts.tau
        body = ("<p>tau score: mean |a| of the neuron over the mean of mean |a| in its layer "
                "(Sokar et al. 2023), in every run of this model; dormant at or below tau.</p>")
        labels, values, trs = [], [], []
        rows = rows.with_columns(pl.Series("order", [D.step_of(v) for v in rows["revision"]],
                                           dtype=pl.Int64)) \
            .sort(["order", "finished_at"], nulls_last=True)
        for r in rows.iter_rows(named=True):
            t = tau.get(r["run_id"], 0.1)
            label = r["revision"] or r["run_id"]
            labels.append(label)  # the table below names the run of each point
            values.append(r["score"])
            trs.append(f'<tr data-run="{esc(r["run_id"])}"><td>{self.run_link(r["run_id"], 2)}'
                       f'</td><td>{esc(r["revision"] or "–")}</td>{cell(r["score"])}'
                       f'<td>{"dormant" if r["score"] <= t else "alive"}</td>'
                       f'{cell(r["frequency"], pct(r["frequency"]))}</tr>')
        if rows.height > 1:
            body += P.svg_line(labels, values, threshold=tau.get(key.run, 0.1),
                               ylabel="tau score")
        body += table(["run", "revision", "tau score", "state", "frequency"], trs,
                      cls="neuron-dormancy")
        return head + body + "</section>"

    def _gradient_section(self, facts, key, nid, row) -> str:
        head = '<section id="gradient"><h2>Gradient importance</h2>'
        name = self.plan.gradients.get(key.run)
        if name is None or row is None or row.get("gradient") is None:
            at = f" at revision {facts.info.revision}" if facts.info.revision else ""
            rev = f" --revision {facts.info.revision}" if facts.info.revision else ""
            return head + missing(f"no neuron gradients of {facts.info.model}{at}",
                                  f"nwh gradients --model {facts.info.model}{rev}") + "</section>"
        rank = facts.gradient_rank.get(nid)
        total = len(facts.gradient_rank)
        return (head + f'<p>Result {esc(name)}: mean dL/da <span data-name="grad_mean" '
                f'data-value="{row["grad_mean"]!r}">{fmt(row["grad_mean"])}</span>, mean '
                f'|dL/da| <span data-name="grad_mean_abs" data-value="{row["gradient"]!r}">'
                f'{fmt(row["gradient"])}</span>: rank <b class="grad-rank" data-value="{rank}">'
                f"{rank}</b> of {total:,} neurons.</p></section>")

    # -- run page

    def run_page(self, info: D.RunInfo, tokens: D.Tokens, rows: list[int]) -> None:
        run, depth = info.run_id, 1
        r = info.row
        facts = [("model", esc(info.model)), ("revision", esc(info.revision or "–")),
                 ("input", esc(f"{r['input_kind']}: {r['input']}"[:200])),
                 ("token rows", f"{r['num_rows']:,} ({r['num_included']:,} included)"),
                 ("sequences", f"{r['num_samples']:,}"),
                 ("layers × neurons", f"{r['num_layers']} layers, {r['num_neurons']:,} neurons"),
                 ("active rule", esc(f"{info.rule} > {r['active_threshold']:g}")),
                 ("dense activations", "every layer" if set(info.layers) <= info.dense else
                  (", ".join(map(str, sorted(info.dense))) or "none (masks only)")),
                 ("co-activation pairs", str(len(info.pairs)))]
        body = '<dl class="facts">' + "".join(f"<dt>{esc(a)}</dt><dd>{b}</dd>"
                                              for a, b in facts) + "</dl>"
        if run in self.graph_runs:
            body += f'<p>{link(self.href(f"graphs/{run}.html", depth), "Layered graph of sample token rows")}</p>'
        stats = self.wh.frame("site_layer_stats", run_id=run)
        trs = [f'<tr data-layer="{s["layer"]}"><td>{s["layer"]}</td>{cell(int(s["neurons"]))}'
               f'{cell(s["mean_frequency"], pct(s["mean_frequency"]))}{cell(int(s["never_active"]))}'
               f'{cell(s["mean_activation"])}{cell(s["max_activation"])}</tr>'
               for s in stats.iter_rows(named=True)]
        body += "<h2>Layers</h2>" + table(["layer", "neurons", "mean frequency", "never active",
                                           "mean activation", "max activation"], trs,
                                          cls="layers")
        body += self._run_neurons(info, depth)
        body += self._sample_maps(info, rows, depth)
        self.page(f"runs/{run}.html", f"Run {run}", body)

    def _run_neurons(self, info, depth) -> str:
        keys = self.plan.pages[info.run_id]
        head = (f"<h2>Neuron pages</h2><p>The top {self.config.top} by {self.config.score} "
                f"({SCORE_HELP[self.config.score]}), and the neurons asked for with --neuron. "
                "Any other neuron: <code>nwh site --neuron "
                f"{esc(info.run_id)}:LAYER/NEURON</code>.</p>")
        if info.run_id in self.plan.notes:
            head += missing(self.plan.notes[info.run_id])
        if not keys:
            return head
        scores = self.plan.scores[info.run_id]
        by = {(r["layer"], r["neuron"]): r for r in scores.iter_rows(named=True)}
        trs = []
        for k in keys:
            r = by.get((k.layer, k.neuron), {})
            trs.append(f'<tr data-layer="{k.layer}" data-neuron="{k.neuron}">'
                       f"<td>{self.neuron_link(k.run, k.layer, k.neuron, depth)}</td>"
                       f'{cell(r.get("frequency"), pct(r.get("frequency")))}{cell(r.get("mean"))}'
                       f'{cell(r.get("max"))}{cell(r.get("excess"))}{cell(r.get("gradient"))}</tr>')
        return head + table(["neuron", "frequency", "mean", "max", "excess", "mean |dL/da|"], trs,
                            cls="run-neurons")

    def _sample_maps(self, info, rows, depth) -> str:
        from pipeline.report import plots

        if not rows:
            return ""
        group = arrays.open_group(self.storage.arrays(info.run_id), mode="r")
        tok = tables.read_partition(self.storage, "tokens", info.run_id)
        row = rows[0]
        values, text = plots.activation_map(group, info.manifest, tok, row)
        shown = plots.map_uses_acts(info.manifest)
        title = f"{info.run_id}: row {row} (sample {tok['sample'][row].as_py()}, position " \
                f"{tok['position'][row].as_py()})"
        out = "<h2>Sample activation map</h2>"
        for mode in ("default", "cinematic"):
            name = f"{info.run_id}_sample_{row}_{mode}.png"
            plots.plot_sample_activations(values, self.figures / name, mode=mode, text=text,
                                          title=title, label=f"{info.run_id}: row {row}",
                                          values=shown)
            what = "activations clipped at 0" if shown else "active bits of the run's rule"
            caption = (f"{info.run_id}, token row {row}: every layer's neurons as a grid "
                       f"({what}; {'blue = inactive, red = the layer’s largest' if mode == 'default' else 'white = active, on black'}).")
            out += P.figure(self.href(f"figures/{name}", depth), caption, dark=mode != "default")
        return out

    # -- graph page

    def graph_page(self, info: D.RunInfo, tokens: D.Tokens, rows: list[int]) -> None:
        run = info.run_id
        graphs = D.graph_of_rows(self.storage, info, tokens, rows, edges=self.config.graph_edges)
        pages = {f"{k.layer}/{k.neuron}": self.href(k.path, 1) for k in self.plan.pages[run]}
        options = "".join(f'<option value="{k}">row {g["row"]} (sample {g["sample"]}, position '
                          f'{g["position"]}): …{esc(g["text"][-60:])}</option>'
                          for k, g in enumerate(graphs))
        body = (f"<p>Each column is a recorded layer of {esc(run)}; a dot is a neuron active at "
                "the chosen token row (height: its index in the layer; colour: its activation "
                "where stored), a line one of the strongest co-activation edges between active "
                "neurons of adjacent layers (Jaccard weight of the run's counts; darker = "
                "stronger). Drag to pan, wheel to zoom; click a neuron with a page to open it."
                "</p>"
                f'<p><label>token row <select id="graph-row">{options}</select></label> '
                '<button id="graph-reset" type="button">reset zoom</button></p>'
                '<div id="graph" class="graph"></div><div id="graph-edges"></div>')
        self.page(f"graphs/{run}.html", f"Layered graph of {run}", body,
                  data={"graph-data": {"run": run, "graphs": graphs, "pages": pages}})
        self.graph_runs.append(run)

    # -- dormancy page

    def dormancy_frame(self) -> pl.DataFrame:
        d = self.wh.frame("site_dormancy")
        if d.height:
            steps = [s if s is not None else D.step_of(r)
                     for s, r in zip(d["step"].to_list(), d["revision"].to_list())]
            d = d.with_columns(pl.Series("step", steps, dtype=pl.Int64))
        return d

    def dormancy_groups(self) -> list[tuple[tuple, pl.DataFrame]]:
        d = self.dormancy_frame()
        if not d.height:
            return []
        groups = []
        for key, part in d.group_by(["model", "definition", "threshold"], maintain_order=True):
            groups.append((key, part))
        return groups

    def dormancy_grid(self, part: pl.DataFrame) -> tuple[list[str], list[int], dict]:
        """Checkpoint labels (training order), layers, and (layer, label) -> row."""
        ck = part.unique(["run_id"], maintain_order=True)
        ck = ck.with_columns(pl.col("step").fill_null(-1)).sort(["step", "finished_at"],
                                                                  nulls_last=True)
        labels = []
        by_run = {}
        for r in ck.iter_rows(named=True):
            label = r["revision"] if r["revision"] not in (None, "N/A") else r["run_id"]
            if label in labels:
                label = r["run_id"]
            labels.append(label)
            by_run[r["run_id"]] = label
        layers = sorted(set(part["layer"].to_list()))
        grid = {(r["layer"], by_run[r["run_id"]]): r for r in part.iter_rows(named=True)}
        return labels, layers, grid

    def dormancy_table(self, part: pl.DataFrame, *, max_layers: int = 64) -> str:
        labels, layers, grid = self.dormancy_grid(part)
        trs = []
        for layer in layers[:max_layers]:
            tds = "".join(cell(grid[(layer, lab)]["pct_dormant"],
                               f'{grid[(layer, lab)]["pct_dormant"]:.1f}')
                          if (layer, lab) in grid else "<td>–</td>" for lab in labels)
            trs.append(f'<tr data-layer="{layer}"><td>{layer}</td>{tds}</tr>')
        more = (f'<p class="hint">The first {max_layers} of {len(layers)} layers: every layer '
                f'is on the {link("dormancy.html", "dormancy page")}.</p>'
                if len(layers) > max_layers else "")
        return table(["layer \\ checkpoint", *labels], trs, cls="dormancy-grid") + more

    def dormancy_page(self) -> None:
        from pipeline.report import plots

        groups = self.dormancy_groups()
        if not groups:
            body = missing("the dormancy table has no rows",
                           "nwh dormancy --run RUN (one run) or nwh dormancy-sweep --model "
                           "MODEL (every checkpoint)")
            self.page("dormancy.html", "Dormancy", body)
            return
        body = ("<p>Share of dormant neurons (%) per layer and checkpoint, as the dormancy "
                "table holds it: one group per model, definition and threshold.</p>")
        for k, ((model, definition, threshold), part) in enumerate(groups):
            title = f"{model}: {definition} ≤ {threshold:g}"
            df = part.with_columns(pl.col("layer").alias("layer_index"))
            prefix = f"dormancy_{k}_"
            figs = []
            try:
                figs = plots.dormancy_figures(df, self.figures, prefix)
            except UserError as e:
                body += missing(str(e))
            captions = [f"{model} ({definition} ≤ {threshold:g}): share of dormant neurons over "
                        "training: mean over layers, and the min-max band.",
                        f"{model} ({definition} ≤ {threshold:g}): dormant neurons (%) per layer "
                        "(rows) and checkpoint (columns).",
                        f"{model}: the layers whose dormancy changes most over training."]
            body += f'<h2 id="group-{k}">{esc(title)}</h2>'
            body += self.dormancy_table(part)
            order = [1, 0, 2]  # the heatmap first: it holds every number
            for i in order:
                if i < len(figs):
                    body += P.figure(f"figures/{figs[i].name}", captions[i])
        self.page("dormancy.html", "Dormancy", body)

    # -- subsets page

    def subsets_page(self) -> None:
        from pipeline.report import graph as graph_figures

        grid = self.wh.frame("site_subsets")
        members = self.wh.frame("site_subset_members")
        analysis = self.wh.frame("site_threshold_analysis")
        if not grid.height and not analysis.height:
            self.page("subsets.html", "Subsets", missing(
                "no subset and no threshold analysis yet",
                "nwh graph --run RUN --threshold 0.5, then nwh subset-grid --run RUN "
                "--thresholds 0.5 --ratios 0.005 0.01 --methods degree pagerank"))
            return
        body = ""
        for run in dict.fromkeys(grid["run_id"].to_list() + analysis["run_id"].to_list()):
            body += f"<h2>{self.run_link(run, 0)}</h2>"
            g = grid.filter(pl.col("run_id") == run)
            if g.height:
                trs = [f'<tr data-subset="{esc(r["subset"])}"><td>{esc(r["subset"])}</td>'
                       f'<td>{esc(r["method"])}</td><td>{esc(r["weight"])}</td>'
                       f'{cell(r["threshold"])}{cell(r["ratio"])}{cell(int(r["size"]))}'
                       f'{cell(int(r["layers"]))}</tr>' for r in g.iter_rows(named=True)]
                body += "<h3>Subset grid</h3>" + table(
                    ["subset", "centrality", "weight", "threshold", "ratio", "neurons", "layers"],
                    trs, cls="subset-grid")
                m = members.filter(pl.col("run_id") == run)
                name = f"subsets_{run}_layers.png"
                graph_figures.plot_subset_layers(m, self.figures / name, run=run)
                body += P.figure(f"figures/{name}", f"{run}: how many neurons of each subset "
                                 "sit in each layer.")
                for sub in g["subset"].to_list():
                    mm = m.filter(pl.col("subset") == sub).head(PAGE_TABLE_ROWS)
                    items = ", ".join(self.neuron_link(run, int(l), int(n), 0) for l, n in
                                      zip(mm["layer"], mm["neuron"]))
                    body += (f'<p class="members"><b>{esc(sub)}</b> (most central first): '
                             f"{items}</p>")
            else:
                body += missing("no subset of this run", f"nwh subset-grid --run {run}")
            a = analysis.filter(pl.col("run_id") == run)
            for weight in dict.fromkeys(a["weight"].to_list()):
                part = a.filter(pl.col("weight") == weight)
                name = f"threshold_{run}_{weight}.png"
                graph_figures.plot_threshold_analysis(part, self.figures / name, weight, run=run)
                body += P.figure(f"figures/{name}", f"{run}: edges kept, nodes and components, "
                                 f"and component sizes of the co-activation graph per {weight} "
                                 "threshold.")
        self.page("subsets.html", "Subsets", body)

    # -- ablation page

    def ablation_page(self) -> None:
        from pipeline.report import ablation as ablation_figures

        summary = self.wh.frame("site_ablation")
        if not summary.height:
            self.page("ablation.html", "Ablation", missing(
                "no ablation yet", "nwh ablate --run RUN --subsets NAME... --controls 5"))
            return
        body = ("<p>Each influential subset ablated on held-out text, against random control "
                "subsets of the same per-layer sizes. p: the empirical p-value, (controls with "
                "an effect at least the subset's + 1) / (controls + 1).</p>")
        for (run, mode), part in summary.group_by(["run_id", "mode"], maintain_order=True):
            body += f"<h2>{self.run_link(run, 0)}: {esc(mode)} ablation</h2>"
            body += self.ablation_table(part)
            name = f"ablation_{run}_{mode}.png"
            ablation_figures.plot_effects(part, self.figures / name, run=run, mode=mode)
            body += P.figure(f"figures/{name}", f"{run} ({mode} ablation): KL and change in loss "
                             "against subset size; dashed: the controls' mean, band ±1 sd; "
                             "labels: p-values of KL.")
            gens = self.wh.frame("site_generations", run_id=run).filter(pl.col("mode") == mode)
            if gens.height:
                trs = [f'<tr><td>{r["prompt"]}</td><td>{esc(r["subset"])}</td>'
                       f'<td class="gen">{esc(r["generated_text"])}</td></tr>'
                       for r in gens.iter_rows(named=True)]
                body += "<h3>Generations (first sample of each prompt)</h3>" + table(
                    ["prompt", "subset", "text"], trs, cls="generations")
        self.page("ablation.html", "Ablation", body)

    def ablation_table(self, part: pl.DataFrame) -> str:
        fewest = int(part["controls"].min()) if part.height else 0
        note = (f'<p class="hint">With {fewest} controls the smallest p-value possible is '
                f"{1 / (fewest + 1):.3g}: more --controls resolve smaller ones.</p>")
        trs = []
        for r in part.iter_rows(named=True):
            ctrl = (f'{fmt(r["kl_control_mean"])} ± {fmt(r["kl_control_std"])}'
                    if r["controls"] else "–")
            dctrl = (f'{fmt(r["delta_loss_control_mean"])} ± {fmt(r["delta_loss_control_std"])}'
                     if r["controls"] else "–")
            trs.append(f'<tr data-run="{esc(r["run_id"])}" data-mode="{esc(r["mode"])}" '
                       f'data-subset="{esc(r["subset"])}"><td>{esc(r["subset"])}</td>'
                       f'{cell(int(r["size"]))}{cell(r["kl"])}<td>{ctrl}</td>'
                       f'{cell(r["kl_p_value"])}{cell(r["delta_loss"])}<td>{dctrl}</td>'
                       f'{cell(r["delta_loss_p_value"])}{cell(int(r["controls"]))}</tr>')
        return table(["subset", "neurons", "KL (nats/token)", "controls: mean ± sd", "p (KL)",
                      "Δ loss (nats/token)", "controls: mean ± sd", "p (Δ loss)", "controls"],
                     trs, cls="ablation") + note

    # -- universal page

    def universal_page(self) -> None:
        from pipeline.report import universal as uni_figures

        summary = self.wh.frame("site_universal")
        if not summary.height:
            self.page("universal.html", "Universal neurons", missing(
                "no universal result yet", "nwh universal --models MODEL_A MODEL_B ..."))
            return
        results = {r.name: r for r in D.universal_results(self.storage, summary)}
        body = ""
        for s in summary.iter_rows(named=True):
            name, result = s["name"], results[s["name"]]
            neurons = pl.from_arrow(tables.read_partition(self.storage, "universal_neurons", name))
            corr = pl.from_arrow(tables.read_partition(self.storage, "correlation_summary", name))
            body += f"<h2>{esc(name)}</h2><p>{self.universal_sentence(s, result)}</p>"
            fname = f"universal_{name}_layers.png"
            uni_figures.plot_layers(neurons, self.figures / fname, threshold=result.threshold,
                                    name=name)
            body += P.figure(f"figures/{fname}", f"{name}: excess correlation per layer against "
                             f"the threshold {result.threshold:g}; red numbers count the "
                             "universal neurons of each layer.")
            if corr.height:
                fname = f"universal_{name}_correlations.png"
                uni_figures.plot_correlations(corr, self.figures / fname, neurons=neurons,
                                              threshold=result.threshold, name=name)
                body += P.figure(f"figures/{fname}", f"{name}: max correlation with the other "
                                 "models' neurons vs the baseline's, and per neuron the mean "
                                 "max against the mean baseline.")
            top = self.wh.frame("site_universal_top", name=name, k=PAGE_TABLE_ROWS)
            runs = [r for r in self.plan.page_runs if self.plan.universal.get(r) is result]
            trs = []
            for r in top.iter_rows(named=True):
                where = self.neuron_link(runs[0], r["layer"], r["neuron"], 0) if runs else \
                    esc(f"L{r['layer']}/{r['neuron']}")
                trs.append(f'<tr data-layer="{r["layer"]}" data-neuron="{r["neuron"]}">'
                           f"<td>{where}</td>{cell(r['mean_corr'])}{cell(r['mean_baseline'])}"
                           f"{cell(r['excess'])}<td>{'yes' if r['universal'] else 'no'}</td></tr>")
            body += f"<h3>Largest excess ({esc(result.models[0] if result.models else '')})</h3>" + \
                table(["neuron", "mean max r", "mean baseline", "excess", "universal"], trs,
                      cls="universal-top")
        self.page("universal.html", "Universal neurons", body)

    def universal_sentence(self, s: dict, result: D.UniversalResult) -> str:
        models = ", ".join(result.models) or "?"
        where = f"L{s['max_layer']}/{s['max_neuron']}"
        if s["universal"]:
            return (f'<b class="universal-count" data-value="{s["universal"]}">'
                    f'{s["universal"]:,}</b> of {s["neurons"]:,} neurons of {esc(models.split(", ")[0])} '
                    f"are universal across {esc(models)} (rule {esc(result.rule)}, threshold "
                    f"{result.threshold:g}); the largest excess is "
                    f'<span class="max-excess" data-value="{s["max_excess"]!r}">'
                    f'{s["max_excess"]:.3g}</span> ({esc(where)}).')
        return (f'<b class="universal-count" data-value="0">No</b> universal neuron at '
                f"{result.threshold:g} among {s['neurons']:,} neurons ({esc(models)}); the "
                f'largest excess is <span class="max-excess" data-value="{s["max_excess"]!r}">'
                f'{s["max_excess"]:.2f}</span> ({esc(where)}).')

    # -- gradients page

    def gradients_page(self) -> None:
        from pipeline.report import gradients as grad_figures

        leaders = self.wh.frame("site_gradient_leaders", k=PAGE_TABLE_ROWS)
        if not leaders.height:
            self.page("gradients.html", "Gradient importance", missing(
                "no neuron gradients yet", "nwh gradients --model MODEL"))
            return
        body = "<p>Mean |dL/da| over token positions of the next-token loss, per neuron.</p>"
        for (name,), part in leaders.group_by(["name"], maintain_order=True):
            body += f"<h2>{esc(name)}</h2>" + self.gradient_table(part, 0)
            rows = pl.from_arrow(tables.read_partition(self.storage, "neuron_gradients", name))
            rows = rows.filter(pl.col("kind") == "neuron")
            if rows.height:
                layers = {int(l): p for (l,), p in rows.group_by(["layer"], maintain_order=True)}
                layers = dict(sorted(layers.items()))
                fname = f"gradients_{name}.png"
                grad_figures.plot_combined(layers, ["mean_abs", "mean"], self.figures / fname)
                body += P.figure(f"figures/{fname}", f"{name}: gradients per layer (boxes without "
                                 "outliers).")
        self.page("gradients.html", "Gradient importance", body)

    def gradient_table(self, part: pl.DataFrame, depth: int) -> str:
        runs = {}
        for run in self.plan.page_runs:
            g = self.plan.gradients.get(run)
            if g:
                runs.setdefault(g, run)
        trs = []
        for r in part.iter_rows(named=True):
            run = runs.get(r["name"])
            where = self.neuron_link(run, r["layer"], r["neuron"], depth) if run else \
                esc(f"L{r['layer']}/{r['neuron']}")
            trs.append(f'<tr data-neuron-id="{r["neuron_id"]}"><td>{r["rank"]}</td>'
                       f"<td>{where}</td>{cell(r['grad_mean_abs'])}{cell(r['grad_mean'])}</tr>")
        return table(["rank", "neuron", "mean |dL/da|", "mean dL/da"], trs, cls="gradients")

    # -- index

    def index_page(self) -> None:
        runs = self.wh.frame("site_runs")
        runs = runs.filter(pl.col("run_id").is_in(list(self.plan.infos)))
        body = self.search_box()
        trs = [f'<tr data-run="{esc(r["run_id"])}"><td>{self.run_link(r["run_id"], 0)}</td>'
               f'<td>{esc(r["model"])}</td><td>{esc(r["revision"] or "–")}</td>'
               f'<td>{esc(r["input_kind"])}</td>{cell(int(r["num_rows"]))}'
               f'{cell(int(r["num_layers"]))}{cell(int(r["num_neurons"]))}'
               f'<td>{esc(r["active_rule"])}</td>{cell(int(r["coact_pairs"]))}'
               f'{cell(len(self.plan.pages.get(r["run_id"], [])))}</tr>'
               for r in runs.iter_rows(named=True)]
        body += '<h2 id="runs">Runs</h2>' + table(
            ["run", "model", "revision", "input", "token rows", "layers", "neurons", "rule",
             "co-activation pairs", "neuron pages"], trs, cls="runs")
        models = runs.group_by("model", maintain_order=True).agg(
            pl.len().alias("runs"), pl.col("revision").unique().sort().alias("revisions"),
            pl.col("num_rows").sum().alias("rows"), pl.col("num_neurons").max().alias("neurons"))
        trs = [f'<tr><td>{esc(m["model"])}</td>{cell(int(m["runs"]))}'
               f'<td>{esc(", ".join(str(x) for x in m["revisions"] if x is not None))}</td>'
               f'{cell(int(m["rows"]))}{cell(int(m["neurons"]))}</tr>'
               for m in models.iter_rows(named=True)]
        total = int(runs["num_rows"].sum()) if runs.height else 0
        body += ('<h2 id="models">Models and tokens</h2>'
                 f'<p><b class="total-rows" data-value="{total}">{total:,}</b> token rows in '
                 f"{runs.height} runs of {models.height} model(s).</p>"
                 + table(["model", "runs", "revisions", "token rows", "neurons"], trs,
                         cls="models"))
        body += self.index_dormancy()
        body += self.index_ablation()
        body += self.index_universal()
        body += self.index_gradients()
        self.page("index.html", f"Neuron Warehouse: {self.storage.root.resolve().name}", body,
                  scripts=["data/search.js"])

    def search_box(self) -> str:
        options = "".join(f'<option value="{esc(r)}">{esc(r)}</option>'
                          for r in self.plan.page_runs)
        return ('<section id="search" class="search"><h2>Search</h2>'
                '<form id="search-form" onsubmit="return false">'
                f'<label>run <select id="search-run"><option value="">every run</option>'
                f"{options}</select></label> "
                '<label>neuron <input id="search-neuron" placeholder="layer/neuron, e.g. 2/17" '
                'size="18"></label> '
                '<label>or token <input id="search-token" placeholder="e.g.  def" size="18">'
                "</label></form>"
                '<div id="search-results"></div>'
                '<p class="hint">A token search lists the neurons whose firing rate on that '
                "token most exceeds their rate overall, among each run's most frequent tokens."
                "</p></section>")

    def index_dormancy(self) -> str:
        head = '<h2 id="dormancy">Dormant neurons per layer and checkpoint</h2>'
        groups = self.dormancy_groups()
        if not groups:
            return head + missing("the dormancy table has no rows",
                                  "nwh dormancy --run RUN, or nwh dormancy-sweep --model MODEL")
        out = head
        for (model, definition, threshold), part in groups:
            out += f"<h3>{esc(model)}: {esc(definition)} ≤ {threshold:g} (%)</h3>"
            out += self.dormancy_table(part, max_layers=16)
        return out + f'<p>{link("dormancy.html", "Figures and every layer")}</p>'

    def index_ablation(self) -> str:
        head = '<h2 id="ablation">Influential subsets: ablation effect against controls</h2>'
        summary = self.wh.frame("site_ablation")
        if not summary.height:
            subsets = self.wh.frame("site_subsets")
            if subsets.height:
                run = subsets["run_id"][0]
                return head + missing("subsets exist but none is ablated yet",
                                      f"nwh ablate --run {run} --subsets "
                                      f"{' '.join(subsets['subset'].head(3))} --controls 5")
            return head + missing("no subset ablated yet",
                                  "nwh subset-grid --run RUN, then nwh ablate --run RUN "
                                  "--subsets NAME... --controls 5")
        out = head
        for (run, mode), part in summary.group_by(["run_id", "mode"], maintain_order=True):
            out += f"<h3>{esc(run)} ({esc(mode)} ablation)</h3>" + self.ablation_table(part)
        return out + f'<p>{link("ablation.html", "Figures and generations")}</p>'

    def index_universal(self) -> str:
        head = '<h2 id="universal">Universal neurons</h2>'
        summary = self.wh.frame("site_universal")
        if not summary.height:
            models = sorted({i.model for i in self.plan.infos.values()})
            return head + missing("no universal result yet", "nwh universal --models "
                                  + " ".join(models[:3] if len(models) > 1 else
                                             [models[0], "OTHER"]))
        results = {r.name: r for r in D.universal_results(self.storage, summary)}
        out = head + "".join(f'<p data-name="{esc(s["name"])}"><b>{esc(s["name"])}</b>: '
                             f'{self.universal_sentence(s, results[s["name"]])}</p>'
                             for s in summary.iter_rows(named=True))
        return out + f'<p>{link("universal.html", "Figures and the largest excess")}</p>'

    def index_gradients(self) -> str:
        head = '<h2 id="gradients">Gradient importance leaders</h2>'
        leaders = self.wh.frame("site_gradient_leaders", k=LEADERS)
        if not leaders.height:
            models = sorted({i.model for i in self.plan.infos.values()})
            return head + missing("no neuron gradients yet", f"nwh gradients --model {models[0]}")
        out = head
        for (name,), part in leaders.group_by(["name"], maintain_order=True):
            out += f"<h3>{esc(name)}</h3>" + self.gradient_table(part, 0)
        return out + f'<p>{link("gradients.html", "Every result")}</p>'

    # -- search data

    def search_data(self) -> None:
        import json

        data = {"runs": {}, "tokens": {}}
        for run in self.plan.page_runs:
            info = self.plan.infos[run]
            data["runs"][run] = {
                "model": info.model,
                "widths": {str(l): w for l, w in info.widths.items()},
                "pages": {f"{k.layer}/{k.neuron}": k.path for k in self.plan.pages[run]}}
            data["tokens"][run] = {
                t: [[e["layer"], e["neuron"], round(e["p_token"], 4), round(e["p_all"], 4),
                     e["hits"], e["count"]] for e in entries]
                for t, entries in self.search_tokens.get(run, {}).items()}
        text = "window.NWH_SEARCH = " + json.dumps(data, separators=(",", ":")) + ";\n"
        self.write("data/search.js", text)


class NeuronFacts:
    """Everything the pages of one run's neurons need, read once for all of them."""

    def __init__(self, b: SiteBuilder, info: D.RunInfo, tokens: D.Tokens, scores: pl.DataFrame,
                 wanted: dict[int, list[int]], ids: list[int]):
        cfg = b.config
        self.info = info
        self.scores = scores
        self._rows = {r["neuron_id"]: r for r in scores.filter(pl.col("neuron_id").is_in(ids))
                      .iter_rows(named=True)}
        self.signs = b.wh.frame("site_sign", run_id=info.run_id, neuron_ids=ids) if info.gated \
            else pl.DataFrame()
        sign_rows = b.wh.frame("site_sign_examples", run_id=info.run_id, neuron_ids=ids) \
            if info.gated else pl.DataFrame()
        stats = scores.filter(pl.col("neuron_id").is_in(ids))
        self.arrays = D.neuron_arrays(b.storage, info, tokens, wanted, stats, sign_rows,
                                      k=cfg.examples, context=cfg.context, bins=cfg.bins) \
            if ids else {}
        self.neighbours = D.coact_neighbours(b.storage, info, wanted, k=cfg.neighbours) \
            if info.pairs and ids else {}
        result = b.plan.universal.get(info.run_id)
        self.correlated = D.correlated_neurons(b.storage, result, wanted, k=cfg.neighbours) \
            if result and ids else {}
        self.correlations_summary = b.wh.frame("site_correlations", name=result.name,
                                               neuron_ids=ids) if result else pl.DataFrame(
            schema={"neuron_id": pl.Int64})
        self.logits = D.logit_effects(b.storage, info, wanted, k=cfg.logit_tokens,
                                      device=cfg.device, cache=b.models) if ids \
            else D.LogitEffects()
        self.dormancy = b.wh.frame("site_neuron_dormancy", model=info.model, neuron_ids=ids) \
            if ids else pl.DataFrame(schema={"neuron_id": pl.Int64})
        d = b.dormancy_frame()
        self.tau = {}
        if d.height:
            tau = d.filter(pl.col("definition") == "tau")
            self.tau = {r: float(t) for r, t in zip(tau["run_id"], tau["threshold"])}
        grads = scores.filter(pl.col("gradient").is_not_null()).sort(
            ["gradient", "neuron_id"], descending=[True, False])
        self.gradient_rank = {int(n): k + 1 for k, n in enumerate(grads["neuron_id"])}

    def score_row(self, nid: int) -> dict | None:
        row = self._rows.get(nid)
        if row is None:
            return None
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
