"""The `nwh` process exits without the interpreter's teardown, yet what the teardown would do
that matters still happens: worker threads finish, at-exit handlers run, buffered output
reaches a pipe, and the exit status is main()'s."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import atexit, sys, threading, time
from pathlib import Path

marker = Path(sys.argv[1])

class Noisy:
    def __del__(self):
        print("teardown ran", flush=True)

keep = Noisy()  # a module global: only the interpreter's teardown frees it
atexit.register(lambda: print("at-exit ran"))

def late():
    time.sleep(0.3)
    marker.write_text("thread finished")

threading.Thread(target=late).start()  # not a daemon: the exit must wait for it
print("x" * 200_000)  # stdout is a pipe: block-buffered, flushed by nobody but the exit

from pipeline import cli
if sys.argv[2] == "ok":
    cli.main = lambda: 0
else:
    sys.argv = ["nwh", "sql", "--storage", sys.argv[2], "select 1"]
cli.program()
print("program returned")
"""


@pytest.mark.parametrize("stage", ["ok", "missing-warehouse"])
def test_the_exit_skips_teardown_but_keeps_threads_handlers_and_output(tmp_path, stage):
    marker = tmp_path / "thread.txt"
    argv = [str(marker), "ok" if stage == "ok" else str(tmp_path / "no-such-root")]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == (0 if stage == "ok" else 2), out.stderr
    if stage != "ok":
        assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    assert lines[0] == "x" * 200_000
    assert "at-exit ran" in lines
    assert marker.read_text() == "thread finished"
    assert "teardown ran" not in lines and "program returned" not in lines


def test_python_m_pipeline_exits_through_program(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "sql", "--storage",
                          str(tmp_path / "none"), "select 1"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ")
