"""The CLI: bad input gets one line and exit 2 with nothing lost; `nwh sql` and `nwh trace`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from reference import files_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.core import arrays
from pipeline.core.storage import Storage


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, micro_model_dir, corpus_file) -> Storage:
    root = tmp_path_factory.mktemp("cli")
    code = main(["extract", "--model", str(micro_model_dir), "--corpus", str(corpus_file),
                 "--num-samples", "6", "--max-length", "16", "--store-acts", "--run", "w",
                 "--storage", str(root), "--quiet"])
    assert code == 0
    return Storage(root)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _csv(tmp_path, text):
    p = tmp_path / "prompts.csv"
    p.write_text(text)
    return str(p)


BAD = [
    ("missing column", lambda d, m, c: ["--model", m, "--prompts",
                                        _csv(d, "prompt,number_of_new_tokens\nhi,3\n")]),
    ("misnamed column", lambda d, m, c: ["--model", m, "--prompts",
                                         _csv(d, "prompts,n_new,num_samples\nhi,3,1\n")]),
    ("non-numeric", lambda d, m, c: ["--model", m, "--prompts",
                                     _csv(d, "prompts,number_of_new_tokens,num_samples\nhi,x,1\n")]),
    ("empty csv", lambda d, m, c: ["--model", m, "--prompts", _csv(d, "")]),
    ("layer out of range", lambda d, m, c: ["--model", m, "--corpus", c, "--layers", "0-7"]),
    ("layer malformed", lambda d, m, c: ["--model", m, "--corpus", c, "--layers", "one"]),
    ("unknown model", lambda d, m, c: ["--model", str(d / "no-such-model"), "--corpus", c]),
    ("unknown revision", lambda d, m, c: ["--model", "zoo-s0", "--revision", "step999999",
                                          "--corpus", c]),
    ("run id with separator", lambda d, m, c: ["--model", m, "--corpus", c, "--run", "a/b"]),
    ("unreadable corpus", lambda d, m, c: ["--model", m, "--corpus", str(d / "missing.txt")]),
    ("binary corpus", lambda d, m, c: ["--model", m, "--corpus", _binary(d)]),
]


def _binary(d: Path) -> str:
    p = d / "binary.txt"
    p.write_bytes(b"\xff\xfe\x00\x81" * 100)
    return str(p)


@pytest.mark.parametrize("name,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2(name, make, warehouse, tmp_path, micro_model_dir, corpus_file,
                                   capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = files_of(warehouse.root)
    code, out, err = run_cli(capsys, "extract", *make(tmp_path, str(micro_model_dir),
                                                      str(corpus_file)),
                             "--storage", str(warehouse.root), "--quiet")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert files_of(warehouse.root) == before


def test_storage_not_writable(tmp_path, micro_model_dir, corpus_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "extract", "--model", str(micro_model_dir), "--corpus",
                           str(corpus_file), "--storage", str(blocker / "root"), "--quiet")
    assert code == 2 and "not writable" in err and err.count("\n") == 1


def test_reused_name_with_other_config(warehouse, micro_model_dir, corpus_file, capsys):
    before = files_of(warehouse.root)
    code, _, err = run_cli(capsys, "extract", "--model", str(micro_model_dir), "--corpus",
                           str(corpus_file), "--num-samples", "7", "--max-length", "16",
                           "--store-acts", "--run", "w", "--storage", str(warehouse.root))
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert files_of(warehouse.root) == before


def test_rerun_says_nothing_to_do(warehouse, micro_model_dir, corpus_file, capsys):
    code, out, _ = run_cli(capsys, "extract", "--model", str(micro_model_dir), "--corpus",
                           str(corpus_file), "--num-samples", "6", "--max-length", "16",
                           "--store-acts", "--run", "w", "--storage", str(warehouse.root),
                           "--quiet")
    assert code == 0 and "nothing to do" in out


def test_sql_prints_and_writes(warehouse, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sql", "select run_id, num_rows from runs",
                           "--storage", str(warehouse.root))
    # 6 windows of 16 tokens; the row of run w is printed as one table line
    assert code == 0
    rows = [line for line in out.splitlines() if re.search(r"\bw\b", line)]
    assert len(rows) == 1 and re.search(r"\b96\b", rows[0]), out
    for ext in ("csv", "parquet", "json"):
        path = tmp_path / f"r.{ext}"
        code, _, _ = run_cli(capsys, "sql", "select * from neuron_stats", "--out", str(path),
                             "--storage", str(warehouse.root))
        assert code == 0 and path.exists()
    # truth from the Parquet files themselves (3 layers x 40 neurons), not through nwh
    parts = sorted((warehouse.root / "tables" / "neuron_stats" / "run_id=w").glob("*.parquet"))
    expect = pl.concat([pl.read_parquet(p) for p in parts]).sort("neuron_id")
    assert expect.height == 120
    got = pl.read_parquet(tmp_path / "r.parquet").sort("neuron_id")
    assert got.drop("run_id").equals(expect)
    assert pl.read_csv(tmp_path / "r.csv").sort("neuron_id")["active_count"].to_list() == \
        expect["active_count"].to_list()
    assert sorted(r["neuron_id"] for r in json.loads((tmp_path / "r.json").read_text())) == \
        list(range(120))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_sql_out_refuses_bad_names(warehouse, tmp_path, capsys):
    for bad in (str(tmp_path / "r.txt"), str(tmp_path)):
        code, _, err = run_cli(capsys, "sql", "select 1", "--out", bad,
                               "--storage", str(warehouse.root))
        assert code == 2 and err.startswith("error: --out") and err.count("\n") == 1, err


def test_sql_error_is_one_line(warehouse, capsys):
    code, _, err = run_cli(capsys, "sql", "select nope from neuron_stats",
                           "--storage", str(warehouse.root))
    assert code == 2 and err.startswith("error: query failed") and err.count("\n") == 1


def test_sql_array_macros(warehouse):
    from pipeline.core.warehouse import connect

    group = arrays.open_group(warehouse.arrays("w"), mode="r")
    acts = group["acts/L2"][:].astype(np.float64)
    mask = arrays.unpack_mask(group["active/L1"][:], 40)
    con = connect(warehouse)
    col = con.execute("select row, value from neuron_values('w', 'acts', 2, 3) order by row").fetchall()
    assert [r for r, _ in col] == list(range(96))
    assert np.array_equal([v for _, v in col], acts[:, 3])
    bits = con.execute("select value from neuron_values('w', 'active', 1, 5) order by row").fetchall()
    assert np.array_equal([v for (v,) in bits], mask[:, 5])
    block = con.execute("select row, neuron, value from layer_values('w', 'acts', 2, 10, 13) "
                        "order by row, neuron").fetchall()
    assert len(block) == 3 * 40
    assert np.array_equal(np.array([v for *_, v in block]).reshape(3, 40), acts[10:13])
    top = con.execute("select t.row from neuron_values('w', 'acts', 2, 3) v join tokens t "
                      "on t.run_id = 'w' and t.row = v.row order by v.value desc limit 5").fetchall()
    assert [r for (r,) in top] == list(np.argsort(-acts[:, 3], kind="stable")[:5])
    con.close()


def test_trace_matches_forward(tmp_path, micro_model_dir, capsys):
    text = "the value of a list returns"
    code, out, _ = run_cli(capsys, "trace", "--model", str(micro_model_dir), "--text", text,
                           "--run", "t", "--storage", str(tmp_path), "--device", "cpu")
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    ids = AutoTokenizer.from_pretrained(micro_model_dir)(text, return_tensors="pt")["input_ids"]
    seen = []
    hooks = [b.mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1]))
             for b in model.transformer.h]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    expect = torch.cat(seen).numpy()
    run_dir = Storage(tmp_path).run_dir("t")
    np.testing.assert_allclose(np.load(run_dir / "activation_values.npy"), expect, rtol=1e-5,
                               atol=1e-6)
    vector = np.load(run_dir / "activation_vector.npy")
    assert np.array_equal(vector, (expect > 0).astype(np.uint8))
    ids_txt = [int(x) for x in (run_dir / "active_neurons.txt").read_text().split()]
    assert ids_txt == np.flatnonzero(expect > 0).tolist()


def test_every_stage_has_help_with_examples(capsys):
    from pipeline.cli import build_parser

    parser = build_parser()
    stages = next(a for a in parser._actions if a.dest == "stage").choices
    assert {"zoo", "extract", "trace", "sql", "coactivation", "dormancy", "dormancy-sweep",
            "frequencies", "analyze", "plots", "export", "graph", "subset", "subset-grid",
            "ablate"} <= set(stages)
    for stage in stages:
        with pytest.raises(SystemExit) as e:
            main([stage, "--help"])
        assert e.value.code == 0
        assert "Examples:" in capsys.readouterr().out
