"""`nwh <stage>` imports only its stage's module: the index of stage names agrees with what the
modules declare, a stage's command line leaves the other stages' libraries unimported, and a
stale index still finds the stage."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from pipeline import cli


def test_the_index_names_every_stage_of_its_module():
    declared = {stage.name: name for name in cli.STAGE_MODULES
                for stage in importlib.import_module(name).STAGES}
    assert cli.STAGE_INDEX == declared


@pytest.mark.parametrize("argv", [["extract", "--model", "m"], ["-q", "extract", "--help"],
                                  ["-v", "sql", "select 1"]])
def test_a_stage_imports_its_module_alone(argv):
    stage = next(w for w in argv if not w.startswith("-"))
    code = ("import sys; from pipeline.cli import build_parser; "
            f"build_parser({argv!r}); "
            "print(' '.join(m for m in ('matplotlib', 'polars', 'pipeline.report.plots', "
            "'pipeline.stages.graph') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [], f"nwh {stage} imported {out.stdout.strip()}"
    assert cli.stage_modules(argv) == [cli.STAGE_INDEX[stage]]


def test_help_and_unknown_stages_build_every_stage():
    assert cli.stage_modules([]) == cli.STAGE_MODULES
    assert cli.stage_modules(["--help"]) == cli.STAGE_MODULES
    assert cli.stage_modules(["extrct"]) == cli.STAGE_MODULES
    with pytest.raises(SystemExit):  # argparse's error lists every stage
        cli.build_parser(["extrct"]).parse_args(["extrct"])


def test_a_stale_index_still_finds_the_stage(monkeypatch):
    monkeypatch.setitem(cli.STAGE_INDEX, "sql", "pipeline.stages.zoo")  # the wrong module
    args = cli.build_parser(["sql", "select 1"]).parse_args(["sql", "select 1"])
    assert args.stage == "sql"
    monkeypatch.delitem(cli.STAGE_INDEX, "sql")  # a stage the index does not know
    assert cli.build_parser(["sql", "select 1"]).parse_args(["sql", "select 1"]).stage == "sql"
