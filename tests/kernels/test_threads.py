"""The thread split of an extraction: the rule, the load it is measured from, env overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numba
import pytest
import torch

from pipeline.kernels import threads


@pytest.mark.parametrize("cores,load,expect", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1),
                                               (2, 3.5, 1), (16, 1.0, 15), (16, 0.2, 16),
                                               (1, 0.0, 1)])
def test_numba_gets_the_cores_left_free(cores, load, expect):
    assert threads.numba_threads_for(cores, load) == expect


def test_others_load_subtracts_this_process(monkeypatch):
    """1.5 busy cores of 2 in the window, 0.5 of them this process's: 1.0 core is others'."""
    ticks = iter([(1000, 4000), (1150, 4200)])   # busy, total over both cpus: +150 of +200
    own = iter([10.0, 10.5])                      # CPU seconds of this process
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(threads, "_jiffies", lambda cpus: next(ticks))
    monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(threads.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.others_load({0, 1}) == pytest.approx(1.0)


SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_others_load_sees_a_busy_loop_on_a_core():
    cpus = threads.affinity_cores()
    # a plain interpreter (nothing to import), pinned to one core, spinning
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(max(cpus))])
    try:
        stat = Path(f"/proc/{spinner.pid}/stat")
        deadline = time.monotonic() + 10
        while int(stat.read_text().rsplit(")", 1)[1].split()[11]) < 20:  # utime: it spins
            assert spinner.poll() is None and time.monotonic() < deadline, "spinner did not run"
            time.sleep(0.05)
        # other processes can only add to it: a lower bound holds on a shared machine
        assert threads.others_load(cpus, seconds=0.5) >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_a_users_numba_threads_are_kept(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    with threads.thread_split("cpu") as chosen:
        assert chosen["rule"] == "NUMBA_NUM_THREADS" and chosen["numba"] == numba.get_num_threads()


def test_split_is_undone_after_the_block(monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "others_load", lambda cpus, seconds=0: 100.0)  # every core busy
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    before = (torch.get_num_threads(), numba.get_num_threads())
    with threads.thread_split("cpu") as chosen:
        assert chosen["numba"] == 1 == numba.get_num_threads()
        if not {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} & set(os.environ):
            assert chosen["torch"] == torch.get_num_threads() == chosen["cores"]
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_no_numba_split_for_an_accelerator():
    with threads.thread_split("cuda") as chosen:
        assert chosen["numba"] is None and chosen["torch"] == torch.get_num_threads()
