"""Stage `site`: a static site of the warehouse, a page per neuron, examples first.

    nwh site                                        # every run, 20 neuron pages each
    nwh site --runs demo-corpus --top 50 --score mean
    nwh site --neuron demo-corpus:2/17              # one more page (kept in later builds)
    nwh site --graph demo-corpus:120 demo-corpus:300  # layered graphs of these token rows

Writes storage/reports/<name>/ (default `site`): index.html with the runs, models, tokens and
the headline numbers (dormant % per layer and checkpoint, subsets' ablation effects against
controls with p-values, universal neurons, gradient leaders) and a search by neuron or token;
a page per run, per chosen neuron, per layered graph, and pages for dormancy, subsets,
ablation, universal neurons and gradients with large figures. Open index.html from disk: no
server is needed (data inlined or in .js files beside the pages, nothing from the network).

A neuron page holds its max-activating examples with the tokens shaded by its activation
(dense activations; masks-only runs show rows where it fires, gated runs the top-|a| rows of
sign_examples), its activation histogram and frequency, the four sign combinations of gated
MLPs, the tokens W_out[n] . W_U promotes and suppresses (when the model's weights load), its
co-activation neighbours in adjacent layers, its most correlated neurons in other models
(`nwh universal`), its dormancy over checkpoints and its gradient importance. Sections
without data say which command makes it. The whole folder is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Progress, Stage, at_least, opt
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, validate_run_id

log = logging.getLogger(__name__)

SCORES = ("frequency", "mean", "max", "excess", "gradient")


@dataclass(kw_only=True)
class SiteConfig(Progress):
    name: str = opt("site", help="folder under storage/reports/ the site is written to")
    runs: list[str] = opt([], help="extraction runs that get run and neuron pages (default: "
                          "every finished run)")
    top: int = opt(20, help="neuron pages per run: the top N neurons by --score (0: none)")
    score: str = opt("frequency", choices=SCORES, help="what ranks the neurons: frequency "
                     "(share of rows where active), mean or max activation, excess (excess "
                     "correlation across models, `nwh universal`) or gradient (mean |dL/da|, "
                     "`nwh gradients`)")
    neuron: list[str] = opt([], metavar="RUN:L/n", help="also a page for these neurons, e.g. "
                            "demo-corpus:2/17 (kept by later builds; --fresh forgets them)")
    graph: list[str] = opt([], metavar="RUN[:ROW]", help="layered-graph pages of these runs, at "
                           "these token rows (default: every page run with co-activation "
                           "counts, at the middle token of its first 3 sequences)")
    leaders: int = opt(10, help="also pages for the N neurons of largest gradient and of "
                       "largest excess correlation, and the N most central of each subset "
                       "(what the index and the big pages list; 0: none)")
    examples: int = opt(12, help="max-activating examples per neuron")
    context: int = opt(12, help="tokens of context before each example's token")
    bins: int = opt(40, help="bins of a neuron's activation histogram")
    neighbours: int = opt(8, help="co-activation neighbours per adjacent layer, and correlated "
                          "neurons per other model")
    logit_tokens: int = opt(10, help="promoted and suppressed tokens per neuron (W_out[n] . W_U; "
                            "0: do not load the model)")
    graph_edges: int = opt(300, help="strongest co-activation edges drawn in a layered graph")
    token_index: int = opt(300, help="most frequent tokens of each run indexed for the search "
                           "by token (0: none)")
    device: str = opt("cpu", help="device of the W_out . W_U products (auto, cpu, cuda)")
    fresh: bool = opt(False, help="forget the --neuron pages of earlier builds")

    def __post_init__(self) -> None:
        validate_run_id(self.name)
        for run in self.runs:
            validate_run_id(run)
        if self.score not in SCORES:
            raise UserError(f"--score {self.score!r} is unknown: use one of {', '.join(SCORES)}")
        at_least(self, 0, "top", "leaders", "context", "neighbours", "logit_tokens", "graph_edges",
                 "token_index")
        at_least(self, 1, "examples")
        at_least(self, 2, "bins")
        from pipeline.report.site.build import parse_graph, parse_neuron

        for spec in self.neuron:
            parse_neuron(spec)
        for spec in self.graph:
            parse_graph(spec)


@dataclass
class SiteResult:
    index: Path
    neuron_pages: int
    runs: list[str]
    graphs: list[str]
    pages: list[str]


def run(config: SiteConfig, storage: Storage) -> SiteResult:
    """Plan the pages (every check that can fail first), then write the site under a
    temporary name and rename it onto storage/reports/<name>/."""
    from pipeline.report.site import data
    from pipeline.report.site.build import SiteBuilder, make_plan

    out = storage.reports(config.name)
    # the folder is replaced whole: never one that holds something other than a site
    if out.is_dir() and any(out.iterdir()) and not (out / "site.json").exists():
        raise UserError(f"{out} holds files that are not a site (no site.json): pick another "
                        "--name, or move that folder away")
    with data.Warehouse(storage) as wh:
        plan = make_plan(config, storage, wh, out)
        storage.ensure_writable()
        with atomic_path(out) as tmp:
            built = SiteBuilder(config, storage, wh, plan, tmp, out).build(config.progress)
    return SiteResult(built.index, built.neuron_pages, built.runs, built.graphs, built.pages)


def show(result: SiteResult) -> str:
    return (f"site: {result.index} ({result.neuron_pages} neuron pages, {len(result.runs)} runs, "
            f"{len(result.graphs)} layered graphs)\nopen: {result.index.resolve().as_uri()}")


STAGES = [Stage(
    "site", "A static site of the warehouse: index, a page per neuron (examples first), search.",
    "  nwh site\n"
    "  nwh site --runs demo-corpus --top 50 --score mean\n"
    "  nwh site --neuron demo-corpus:2/17 demo-corpus:3/5\n"
    "  nwh site --graph demo-corpus:120 --graph-edges 500\n"
    "  nwh site --score excess --runs demo-corpus   # after nwh universal\n",
    SiteConfig, run, show)]
