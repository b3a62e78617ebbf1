"""The report page: every PNG of the folders shown once with its caption, every table linked and
written as the CSV of its query; bad input is one line and writes nothing."""

from __future__ import annotations

import csv
import os
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from reference import files_of

from pipeline.cli import main  # noqa: E402
from pipeline.core.errors import UserError  # noqa: E402
from pipeline.core.storage import Storage  # noqa: E402
from pipeline.report.html import ReportConfig, caption, run  # noqa: E402

PNGS = {"a": ["important_neurons.png", "sub/sample_3_cinematic.png"],
        "b": ["dormancy_heatmap.png", "my_own_figure.png"]}
CAPTIONS = {
    "important_neurons": "The most frequently active neurons and those with the largest mean "
                         "activation.",
    "sample_3_cinematic": "Neuron activations of every layer at token row 3 (cinematic mode).",
    "dormancy_heatmap": "Dormant neurons per layer and checkpoint.",
    "my_own_figure": "my own figure",
}
TABLES = ["nums=select range as x, range * range as sq from range(3)",
          "eq=select 'a=b' as text where 1 = 1"]


class Page(HTMLParser):
    """(src, caption) of each figure, h2 headings, and links with their trailing text."""

    def __init__(self):
        super().__init__()
        self.figures, self.headings, self.links = [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.figures.append([attrs["src"], ""])
        elif tag == "a":
            self.links.append([attrs["href"], ""])
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "figcaption":
            self.figures[-1][1] += data
        elif self._in == "h2":
            self.headings.append(data)
        elif self._in == "a":
            self.links[-1][1] += data


@pytest.fixture()
def storage(tmp_path) -> Storage:
    storage = Storage(tmp_path / "s")
    for folder, names in PNGS.items():
        for name in names:
            path = storage.reports(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [1, 0])
            fig.savefig(path)
            plt.close(fig)
    return storage


def test_page_shows_every_figure_and_table(storage, capsys):
    assert main(["report", "--storage", str(storage.root), "--name", "rep", "--folders", "a", "b",
                 "--tables", *TABLES]) == 0
    page = storage.reports("rep") / "index.html"
    assert capsys.readouterr().out.strip() == f"report: {page} (4 figures, 2 tables)"
    parsed = Page()
    parsed.feed(page.read_text())
    want = sorted(str(Path(root) / f) for folder in PNGS
                  for root, _, files in os.walk(storage.reports(folder)) for f in files)
    assert sorted(str((page.parent / src).resolve()) for src, _ in parsed.figures) == \
        sorted(str(Path(p).resolve()) for p in want)
    assert {Path(src).stem: text for src, text in parsed.figures} == CAPTIONS
    assert parsed.headings == ["Tables", "a", "b"]
    assert parsed.links == [["tables/nums.csv", "nums"], ["tables/eq.csv", "eq"]]
    assert "nums</a> (3 rows)" in page.read_text() and "eq</a> (1 rows)" in page.read_text()
    with open(page.parent / "tables" / "nums.csv", newline="") as f:
        assert list(csv.reader(f)) == [["x", "sq"], ["0", "0"], ["1", "1"], ["2", "4"]]
    with open(page.parent / "tables" / "eq.csv", newline="") as f:
        assert list(csv.reader(f)) == [["text"], ["a=b"]]
    leftovers = [p for p in storage.reports("rep").rglob(".*") if ".tmp-" in p.name]
    assert not leftovers


def test_rerun_replaces_the_page(storage):
    first = run(ReportConfig(name="rep", folders=["a"]), storage)
    (storage.reports("a") / "more.png").write_bytes((storage.reports("a") / "important_neurons.png")
                                                    .read_bytes())
    second = run(ReportConfig(name="rep", folders=["a"]), storage)
    assert (first.figures, second.figures) == (2, 3) and first.page == second.page
    assert "more.png" in second.page.read_text()
    assert not first.skipped and not second.skipped


def test_unchanged_page_is_not_rewritten(storage):
    config = ReportConfig(name="rep", folders=["a"], tables=["nums=select 1 as x"])
    first = run(config, storage)
    stamp = first.page.stat().st_mtime_ns
    again = run(config, storage)
    assert again.skipped and again.page.stat().st_mtime_ns == stamp
    changed = run(ReportConfig(name="rep", folders=["a"], tables=["nums=select 2 as x"]), storage)
    assert not changed.skipped  # the same query names with other rows are another page
    with open(changed.page.parent / "tables" / "nums.csv", newline="") as f:
        assert list(csv.reader(f)) == [["x"], ["2"]]


@pytest.mark.parametrize("argv", [
    ["--folders", "a", "missing"],
    ["--folders", "a", "--tables", "no query"],
    ["--folders", "a", "--tables", "t=select 1", "t=select 2"],
    ["--folders", "a", "--tables", "bad name=select 1"],
    ["--folders", "a", "--tables", "t=select * from no_such_table"],
    ["--folders", "../a"],
])
def test_bad_input_is_one_line_and_writes_nothing(storage, capsys, argv):
    before = files_of(storage.root)
    assert main(["report", "--storage", str(storage.root), "--name", "rep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert files_of(storage.root) == before


def test_config_parses_name_sql_items():
    config = ReportConfig(name="r", folders=["a"], tables=["x = select 1 where 2 = 2"])
    assert config.queries == {"x": "select 1 where 2 = 2"}
    with pytest.raises(UserError, match="NAME=SQL"):
        ReportConfig(name="r", folders=["a"], tables=["=select 1"])


def test_captions():
    assert caption("sample_1_default") == "Neuron activations of every layer at token row 1 " \
        "(default mode)."
    assert caption("degrees_normalized_0.5") == "Degrees of the co-activation graph " \
        "(normalized > 0.5)."
    assert caption("unknown_thing") == "unknown thing"
