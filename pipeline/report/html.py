"""A static HTML report: every figure of some report folders with a caption, and table links.

    nwh report --name demo --folders demo demo-corpus demo-prompts universal_zoo-s0_zoo-s1_zoo-s2 \\
        --tables 'runs=select * from runs' 'dormancy=select * from dormancy order by run_id'

Writes storage/reports/<name>/index.html (opens without a server; images by relative path)
and CSV copies of the warehouse tables it links under storage/reports/<name>/tables/. One
figure per row at full width; cinematic maps on a dark frame. For a page per neuron, the
headline numbers and search, build the site instead: `nwh site` (pipeline/report/site/).
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Stage, config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Marker, Storage, atomic_path, validate_run_id

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

CAPTIONS = [
    (r"dormancy_over_steps", "Share of dormant neurons (tau-dormant) over training: mean, min and max across layers."),
    (r"dormancy_heatmap", "Dormant neurons per layer and checkpoint."),
    (r"dormancy_layer_evolution", "The layers whose dormancy changes most during training."),
    (r"sample_(\d+)_(\w+)", "Neuron activations of every layer at token row {0} ({1} mode)."),
    (r"node_activation_counts", "How many token rows each neuron is active in."),
    (r"important_neurons", "The most frequently active neurons and those with the largest mean activation."),
    (r"token_clusters", "Token rows clustered by their binary activation patterns (k-means, PCA projection)."),
    (r"specific_neurons", "How much more often token- and position-specific neurons fire for their key."),
    (r"threshold_analysis_(\w+)", "Edges, nodes and component sizes of the co-activation graph per {0} threshold."),
    (r"edge_weights_(\w+)", "Distribution of the kept co-activation edge weights ({0})."),
    (r"degrees_(\w+?)_([\d.]+)", "Degrees of the co-activation graph ({0} > {1})."),
    (r"ablation_(\w+)", "Effect of ablating influential subsets vs random controls of the same sizes ({0} ablation)."),
    (r"universal_correlations", "Best correlation of each neuron with the other seeds' neurons, and the baseline's."),
    (r"universal_properties", "Weight and activation properties of universal vs other neurons."),
    (r"universal_layers", "Share of universal neurons per layer."),
    (r"layer_(\d+)_gradients", "Loss gradients of layer {0}: distribution and per-unit values."),
    (r"combined_gradients", "Loss-gradient magnitudes per layer."),
]


def caption(stem: str) -> str:
    for pattern, text in CAPTIONS:
        m = re.fullmatch(pattern, stem)
        if m:
            return text.format(*m.groups())
    return stem.replace("_", " ")


@dataclass(kw_only=True)
class ReportConfig:
    name: str = opt(help="report folder to write index.html into")
    folders: list[str] = opt(help="report folders whose figures to show")
    tables: list[str] = opt([], metavar="NAME=SQL", help="tables to link, each written as CSV "
                            "from a query: --tables 'runs=select * from runs' 'top=select ...'")

    def __post_init__(self) -> None:
        for folder in (self.name, *self.folders):
            validate_run_id(folder)
        self.queries  # noqa: B018 - parses (and so validates) every NAME=SQL item

    @property
    def queries(self) -> dict[str, str]:
        """Table name -> SQL of the --tables items."""
        out: dict[str, str] = {}
        for item in self.tables:
            table, _, sql = item.partition("=")
            table = table.strip()
            if not _TABLE_NAME.fullmatch(table) or not sql.strip():
                raise UserError(f"--tables item {item[:60]!r} is malformed: write NAME=SQL, e.g. "
                                "'runs=select * from runs'")
            if table in out:
                raise UserError(f"--tables names {table!r} twice: give each table one query")
            out[table] = sql.strip()
        return out


@dataclass
class ReportResult:
    page: Path
    figures: int
    tables: dict[str, int]  # rows of each linked table
    skipped: bool = False   # the page already shows these figures and tables


def run(config: ReportConfig, storage: Storage) -> ReportResult:
    """index.html over the PNGs of the report folders and CSVs of the tables' queries."""
    from pipeline.core.tables import write_frame

    missing = [f for f in config.folders if not storage.reports(f).is_dir()]
    if missing:
        raise UserError(f"report folder {missing[0]!r} does not exist under "
                        f"{storage.root / 'reports'}: draw its figures first or drop it")
    frames = {table: _query(storage, table, sql) for table, sql in config.queries.items()}
    out = storage.reports(config.name)
    sections, count = [], 0
    for folder in config.folders:
        pngs = sorted(storage.reports(folder).rglob("*.png"))
        count += len(pngs)
        if pngs:
            sections.append(_section(folder, pngs, out))
    links = []
    for table, frame in frames.items():
        links.append(f'<li><a href="tables/{html.escape(table)}.csv">{html.escape(table)}</a> '
                     f"({frame.height} rows)</li>")
    page = _page(config.name, links, sections)
    result = ReportResult(out / "index.html", count, {t: f.height for t, f in frames.items()})
    # the marker sees what the page shows: the page itself and every table's rows
    digest = config_hash(config, page=page, tables={t: f.hash_rows().sum() for t, f in
                                                    frames.items()})
    marker = Marker(out / ".report.json")
    if marker.done(digest) is not None and result.page.exists():
        result.skipped = True
        return result
    for table, frame in frames.items():
        write_frame(frame, out / "tables" / f"{table}.csv")
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page)
    marker.write(to_dict(config), digest, figures=count)
    return result


def _query(storage: Storage, table: str, sql: str):
    from pipeline.core.warehouse import query_frame

    frame = query_frame(storage, sql)
    if frame is None:
        raise UserError(f"--tables {table}: the statement returns no table: give a select query")
    return frame


def _section(folder: str, pngs: list[Path], out: Path) -> str:
    # cinematic maps are white on transparent: they need the dark frame to be seen
    figures = "".join(
        f'<figure{" class=dark" if "cinematic" in png.stem else ""}>'
        f'<img src="{html.escape(os.path.relpath(png, out))}" loading="lazy">'
        f"<figcaption>{html.escape(caption(png.stem))}</figcaption></figure>" for png in pngs)
    return f"<h2>{html.escape(folder)}</h2>\n<div class=grid>{figures}</div>"


def _page(name: str, links: list[str], sections: list[str]) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Neuron Warehouse report: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.grid {{ display: grid; grid-template-columns: 1fr; gap: 1.6em; max-width: 1400px; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: .5em; background: #fafafa; }}
figure.dark {{ background: #111; color: #ddd; }}
img {{ width: 100%; }} figcaption {{ font-size: 1em; margin-top: .3em; }}
</style></head><body>
<h1>Neuron Warehouse report: {html.escape(name)}</h1>
<h2>Tables</h2><ul>{''.join(links)}</ul>
{''.join(sections)}
</body></html>
"""


def show(result: ReportResult) -> str:
    same = " (unchanged: nothing to do)" if result.skipped else ""
    return (f"report: {result.page} ({result.figures} figures, "
            f"{len(result.tables)} tables){same}")


STAGES = [Stage(
    "report", "A static HTML page with every figure of some report folders and table links.",
    "  nwh report --name demo --folders demo demo-corpus demo-prompts\n"
    "  nwh report --name demo --folders demo-corpus --tables 'runs=select * from runs' \\\n"
    "      'top=select * from important_neurons where rank <= 10'\n",
    ReportConfig, run, show)]
