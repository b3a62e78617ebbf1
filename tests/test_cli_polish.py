"""What a user of `nwh` sees: --version, --quiet, hidden library warnings, the examples of
--help, output paths of graph and subset, a mistyped --storage of a reading stage, prompts CSVs
from Excel, and the stdlib corpus cached between processes."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

from pipeline.cli import CREATES_WAREHOUSE, EXAMPLES, build_parser, main
from pipeline.core import stdlib_corpus
from pipeline.core.config import from_args
from pipeline.core.errors import UserError
from pipeline.core.inputs import read_prompts
from pipeline.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, micro_model_dir, corpus_file) -> Storage:
    root = tmp_path_factory.mktemp("polish")
    assert main(extract_args(micro_model_dir, corpus_file, root)) == 0
    return Storage(root)


def extract_args(model, corpus, root, *extra: str) -> list[str]:
    return ["extract", "--model", str(model), "--corpus", str(corpus), "--num-samples", "12",
            "--max-length", "16", "--run", "w", "--storage", str(root), *extra]


# -- --version, --help


def test_version_is_the_pyproject_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"nwh {version}"


def test_help_lists_the_common_flows_and_every_example_is_valid(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = [line.strip() for line in EXAMPLES.splitlines() if line.strip().startswith("nwh ")]
    assert len(examples) >= 12 and all(e in out for e in examples)
    parser = build_parser()
    shown = set()
    for example in examples:
        args = parser.parse_args(shlex.split(example)[1:])
        from_args(args.stage_entry.config, args)  # the options also pass the config's checks
        shown.add(args.stage)
    assert {"zoo", "extract", "sql", "dormancy", "dormancy-sweep", "coactivation", "graph",
            "subset-grid", "ablate", "universal", "gradients", "report", "export"} <= shown


def test_stages_that_create_a_warehouse_are_real_stages():
    stages = next(a for a in build_parser()._actions if a.dest == "stage").choices
    assert CREATES_WAREHOUSE <= set(stages)


# -- --quiet and the log level


def _info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


@pytest.mark.parametrize("quiet", [[], ["--quiet"], ["global"]])
def test_quiet_silences_info_lines(warehouse, micro_model_dir, corpus_file, caplog, capsys,
                                   quiet):
    caplog.set_level(logging.NOTSET)
    argv = extract_args(micro_model_dir, corpus_file, warehouse.root)
    if quiet == ["global"]:
        argv = ["--quiet", *argv]
    else:
        argv += quiet
    level = logging.getLogger().level
    assert main(argv) == 0
    assert logging.getLogger().level == level  # restored for whoever runs main in-process
    info = _info_lines(caplog)
    if quiet:
        assert info == []
    else:
        assert any("nothing to do" in m for m in info), info
    assert "nothing to do" in capsys.readouterr().out  # the result is still printed


def test_quiet_cli_process_prints_no_info_and_no_progress(warehouse, micro_model_dir,
                                                          corpus_file):
    def run(*flags):  # a finished run: it only says there is nothing to do
        return subprocess.run([sys.executable, "-m", "pipeline", *flags,
                               *extract_args(micro_model_dir, corpus_file, warehouse.root)],
                              cwd=ROOT, capture_output=True, text=True)
    loud = run()
    assert loud.returncode == 0 and "INFO pipeline.stages.extract" in loud.stderr, loud.stderr
    quiet = run("--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "nothing to do" in quiet.stdout


# -- library warnings


def test_library_warnings_are_hidden_unless_verbose(tmp_path, monkeypatch):
    import dataclasses

    import pipeline.stages.zoo as zoo

    def warning_run(config, storage):  # what transformers and torch do on a model load
        warnings.warn("`foo` is deprecated and will be removed in v9", FutureWarning,
                      stacklevel=1)
        warnings.warn("TypedStorage is deprecated", UserWarning, stacklevel=1)

    monkeypatch.setattr(zoo, "STAGES", [dataclasses.replace(zoo.STAGES[0], run=warning_run,
                                                            show=None)])
    for verbose, expect in (([], []), (["--verbose"], [FutureWarning, UserWarning])):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main([*verbose, "zoo", "--storage", str(tmp_path)]) == 0
        assert [w.category for w in seen] == expect
    # and the filters were this call's only
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("after", FutureWarning, stacklevel=1)
    assert len(seen) == 1


# -- a mistyped --storage


READING = [
    ["sql", "select 1"],
    ["dormancy", "--run", "w"],
    ["graph", "--run", "w"],
    ["export", "--run", "w", "--out-dir", "{tmp}/exports"],
    ["frequencies", "--run", "w"],
    ["report", "--name", "r", "--folders", "w"],
    ["plots", "--run", "w"],
]


@pytest.mark.parametrize("argv", READING, ids=[a[0] for a in READING])
def test_reading_stage_with_a_missing_storage_is_one_line(tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    missing = tmp_path / "storag"  # a typo
    code = main([*argv, "--storage", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: storage root {str(missing)!r} does not exist: check --storage")
    assert not missing.exists()  # nothing created there
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main([*argv, "--storage", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a warehouse" in err and err.count("\n") == 1, err
    assert list(empty.iterdir()) == []


def test_plots_of_a_dormancy_log_alone_need_no_warehouse(tmp_path, capsys):
    from pipeline.stages.dormancy import LOG_COLUMNS

    log = tmp_path / "log.csv"
    rows = [",".join(LOG_COLUMNS)] + [
        f"2026-01-01,m,step{s},{s},0.1,h.{l},{l},10,{(s + l) % 4},{(s + l) % 4 * 10.0},0.5,1.0"
        for s in (0, 8) for l in (0, 1)]
    log.write_text("\n".join(rows) + "\n")
    root = tmp_path / "fresh"
    assert main(["plots", "--dormancy-log", str(log), "--name", "d", "--storage", str(root)]) == 0
    assert any((root / "reports" / "d").glob("*.png"))


def test_storage_must_exist_flag():
    with pytest.raises(UserError, match="does not exist"):
        Storage("/nonexistent/warehouse", must_exist=True)
    Storage("/nonexistent/warehouse")  # a writing stage creates it


# -- graph and subset say where their outputs landed


def test_graph_and_subset_print_their_output_paths(warehouse, capsys):
    root = str(warehouse.root)
    assert main(["coactivation", "--run", "w", "--storage", root, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["graph", "--run", "w", "--threshold", "0.3", "--storage", root, "--quiet"]) == 0
    out = capsys.readouterr().out
    edges = re.search(r"^edges: (.+)$", out, re.M).group(1)
    analysis = re.search(r"^threshold analysis: (.+)$", out, re.M).group(1)
    assert Path(edges) == warehouse.root / "tables" / "edges" / "run_id=w" / "normalized-0.3.parquet"
    assert Path(edges).is_file() and Path(analysis).is_file()
    assert main(["subset", "--run", "w", "--threshold", "0.3", "--ratio", "0.1", "--storage",
                 root, "--quiet"]) == 0
    out = capsys.readouterr().out
    table = re.search(r"^subsets table: (.+)$", out, re.M).group(1)
    folder, names = re.search(r"^neuron ids: (.+)/ \((.+)\)$", out, re.M).groups()
    assert Path(table) == warehouse.root / "tables" / "subsets" / "run_id=w"
    assert any(Path(table).glob("*.parquet"))
    assert names == "degree_t0.3_r0.1.npy" and (Path(folder) / names).is_file()


# -- prompts CSV


def test_prompts_csv_from_excel_with_a_bom_and_crlf(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfprompts,number_of_new_tokens,num_samples\r\n"
                     b'"the value of",6,2\r\n"r\xc3\xa9sum\xc3\xa9",4,3\r\n')
    prompts = read_prompts(path)
    assert [(p.text, p.new_tokens, p.num_samples) for p in prompts] == \
        [("the value of", 6, 2), ("résumé", 4, 3)]


def test_prompts_csv_with_a_bom_still_checks_its_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,number_of_new_tokens\nhi,3\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) \['prompts'\] \(has \['prompt', "):
        read_prompts(path)


def test_prompts_csv_without_num_samples_says_it_defaults_to_1(tmp_path, caplog):
    path = tmp_path / "p.csv"
    path.write_text("prompts,number_of_new_tokens\nhello,3\nbye,2\n")
    with caplog.at_level(logging.INFO, logger="pipeline.core.inputs"):
        prompts = read_prompts(path)
    assert [p.num_samples for p in prompts] == [1, 1]
    said = [r.getMessage() for r in caplog.records if "num_samples" in r.getMessage()]
    assert len(said) == 1 and "defaults to 1" in said[0] and str(path) in said[0]
    caplog.clear()
    path.write_text("prompts,number_of_new_tokens,num_samples\nhello,3,2\n")
    with caplog.at_level(logging.INFO, logger="pipeline.core.inputs"):
        read_prompts(path)
    assert not [r for r in caplog.records if "defaults to 1" in r.getMessage()]


def test_prompts_csv_not_in_utf8_is_one_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("prompts,number_of_new_tokens\nr\xe9sum\xe9,3\n".encode("cp1252"))
    with pytest.raises(UserError, match="is not UTF-8 text: save it as UTF-8"):
        read_prompts(path)


# -- the stdlib corpus cache


def _fake_stdlib(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "alpha.py").write_text('"""Alpha module: the first document of this library."""\n'
                                   "# a comment block that is long enough to count\n"
                                   "# and goes on for a second line\nx = 1\n")
    (root / "pkg" / "beta.py").write_text('def f():\n    """Beta function docstring, long '
                                          'enough to be kept."""\n')
    (root / "test" / "skipped.py").write_text('"""A test module docstring that is skipped."""\n')
    return root


def test_a_second_build_reads_the_cache_and_gives_the_same_text(tmp_path, monkeypatch):
    root, cache = _fake_stdlib(tmp_path / "lib"), tmp_path / "cache"
    first = stdlib_corpus.load_documents(root, cache)
    assert first == (("alpha.py", "Alpha module: the first document of this library."),
                     ("alpha.py", "a comment block that is long enough to count and goes on "
                                  "for a second line"),
                     ("pkg/beta.py", "Beta function docstring, long enough to be kept."))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("stdlib-corpus-")  # no temporaries

    def no_parse(*_a, **_k):
        raise AssertionError("parsed again instead of reading the cache")

    monkeypatch.setattr(stdlib_corpus, "parse_documents", no_parse)
    assert stdlib_corpus.load_documents(root, cache) == first


@pytest.mark.parametrize("change", ["python", "file", "new file", "corrupt"])
def test_another_key_rebuilds(tmp_path, monkeypatch, change):
    root, cache = _fake_stdlib(tmp_path / "lib"), tmp_path / "cache"
    stdlib_corpus.load_documents(root, cache)
    (old,) = cache.iterdir()
    if change == "python":
        monkeypatch.setattr(stdlib_corpus.sys, "version", "3.99.0 (another build)")
    elif change == "file":
        (root / "pkg" / "beta.py").write_text('"""Beta module, rewritten with new text."""\n')
    elif change == "new file":
        (root / "gamma.py").write_text('"""Gamma: a module installed since the cache."""\n')
    else:
        old.write_text('{"key": "')
    calls = []
    real = stdlib_corpus.parse_documents
    monkeypatch.setattr(stdlib_corpus, "parse_documents",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    docs = stdlib_corpus.load_documents(root, cache)
    assert calls == [1]
    texts = [d for _, d in docs]
    if change == "file":
        assert "Beta module, rewritten with new text." in texts
        assert "Beta function docstring, long enough to be kept." not in texts
    if change == "new file":
        assert "Gamma: a module installed since the cache." in texts
    (new,) = cache.iterdir()  # the cache of the old key is gone
    assert (new.name != old.name) == (change != "corrupt")


def test_no_write_reads_but_leaves_no_cache(tmp_path):
    root, cache = _fake_stdlib(tmp_path / "lib"), tmp_path / "cache"
    stdlib_corpus.load_documents(root, cache, write=False)
    assert not cache.exists()


@pytest.fixture()
def fake_stdlib(tmp_path, monkeypatch):
    from pipeline.models.micro import WORDS

    root = tmp_path / "lib"
    root.mkdir()
    for i in range(30):  # enough text for a few windows of the micro tokenizer
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40))
        (root / f"m{i:02d}.py").write_text(f'"""{words}."""\n')
    monkeypatch.setattr(stdlib_corpus, "stdlib_root", lambda: root)
    stdlib_corpus.collect_documents.cache_clear()
    yield root
    stdlib_corpus.collect_documents.cache_clear()


def test_the_cli_keeps_the_corpus_under_the_storage_root(fake_stdlib, tmp_path, micro_model_dir,
                                                         monkeypatch):
    root = tmp_path / "wh"
    argv = ["extract", "--model", str(micro_model_dir), "--corpus", "stdlib", "--num-samples",
            "2", "--max-length", "16", "--storage", str(root), "--quiet"]
    assert main([*argv, "--dry-run"]) == 0
    assert not root.exists()  # a dry run writes nothing, not even the cache
    assert main(argv) == 0
    cached = list((root / "cache").glob("stdlib-corpus-*.json"))
    assert len(cached) == 1
    stdlib_corpus.collect_documents.cache_clear()  # as a new process would start

    def no_parse(*_a, **_k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(stdlib_corpus, "parse_documents", no_parse)
    assert main([*argv, "--run", "again"]) == 0
    assert os.path.exists(root / "runs" / "again" / "run.json")
