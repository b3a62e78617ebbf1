"""A static HTML report: every figure of some report folders with a caption, and table links.

    nwh report --name demo --folders demo demo-corpus demo-prompts universal_zoo-s0_zoo-s1_zoo-s2

Writes storage/reports/<name>/index.html (opens without a server; images by relative path)
and CSV copies of the warehouse tables it links under storage/reports/<name>/tables/.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path

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


def write_report(storage: Storage, name: str, folders: list[str], tables_sql: dict[str, str]) -> Path:
    """index.html over the PNGs of `folders` (report folder names) and CSVs of `tables_sql`."""
    from pipeline.core.tables import write_frame
    from pipeline.core.warehouse import query_frame

    out = storage.reports(name)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for folder in folders:
        directory = storage.reports(folder)
        if not directory.exists():
            raise UserError(f"report folder {folder!r} does not exist under {storage.reports('x').parent}")
        figures = []
        for png in sorted(directory.rglob("*.png")):
            rel = os.path.relpath(png, out)
            figures.append(f'<figure><img src="{html.escape(rel)}" loading="lazy">'
                           f"<figcaption>{html.escape(caption(png.stem))}</figcaption></figure>")
        if figures:
            sections.append(f"<h2>{html.escape(folder)}</h2>\n<div class=grid>{''.join(figures)}</div>")
    links = []
    for table, sql in tables_sql.items():
        path = out / "tables" / f"{table}.csv"
        frame = query_frame(storage, sql)
        write_frame(frame, path)
        links.append(f'<li><a href="tables/{html.escape(table)}.csv">{html.escape(table)}</a> '
                     f"({frame.height} rows)</li>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Neuron Warehouse report: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1.2em; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: .5em; background: #fafafa; }}
img {{ width: 100%; }} figcaption {{ font-size: .9em; margin-top: .3em; }}
</style></head><body>
<h1>Neuron Warehouse report: {html.escape(name)}</h1>
<h2>Tables</h2><ul>{''.join(links)}</ul>
{''.join(sections)}
</body></html>
"""
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page)
    return out / "index.html"


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "report", "A static HTML page with every figure of some report folders and table links.",
        "  nwh report --name demo --folders demo demo-corpus demo-prompts\n")
    parser.add_argument("--name", required=True, help="report folder to write index.html into")
    parser.add_argument("--folders", nargs="+", required=True, help="report folders whose figures to show")
    parser.add_argument("--table", nargs=2, action="append", default=[], metavar=("NAME", "SQL"),
                        help="a table to link, written as CSV from a query (repeatable)")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    echo(write_report(Storage(args.storage), args.name, args.folders, dict(args.table)))
    return 0
