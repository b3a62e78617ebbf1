"""The one frame writer behind every --out."""

from __future__ import annotations

import csv
import json

import polars as pl
import pytest

from pipeline.core.errors import UserError
from pipeline.core.tables import write_frame


def test_every_format_round_trips_and_lists_become_items_in_csv(tmp_path):
    frame = pl.DataFrame({"a": [1, 2], "ids": [[3, 4], []]})
    write_frame(frame, tmp_path / "f.csv")
    with open(tmp_path / "f.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "ids": "3 4"}, {"a": "2", "ids": ""}]
    write_frame(frame, tmp_path / "f.parquet")
    assert pl.read_parquet(tmp_path / "f.parquet").equals(frame)
    write_frame(frame, tmp_path / "f.json")
    assert json.loads((tmp_path / "f.json").read_text()) == frame.to_dicts()
    write_frame(frame, tmp_path / "f.ndjson")
    assert [json.loads(x) for x in (tmp_path / "f.ndjson").read_text().splitlines()] == \
        frame.to_dicts()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.json", "f.ndjson",
                                                          "f.parquet"]


@pytest.mark.parametrize("name", ["f.txt", "."])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="--out"):
        write_frame(pl.DataFrame({"a": [1]}), tmp_path / name)
