"""How the cores are split between torch's forward and numba's kernels during an extraction.

On the CPU an extraction alternates two parallel runtimes in one thread: torch's forward
(its OpenMP / MKL pool) and the fused numba pass of the accumulators (numba's own OpenMP pool).
Measured with a gpt2-small-shaped model on 2 cores (benchmarks/threads.py):

* loaded machine (another process busy on a core): numba single-threaded made the extraction
  1.9x faster (1,447 -> 2,738 tok/s). With every core in numba's pool, its threads wait at the
  end of each parallel region for the thread that shares a core with the other process, while
  torch's workers still spin after the forward: more runnable threads than cores, and the
  fused pass stalls. Single-threaded, the pass runs in the calling thread and waits on nobody.
* idle machine: numba single-threaded cost 15% (extraction / bare forward 0.912 -> 0.773),
  since the pass then uses one core of two.

So the split is decided from the cores that other processes keep busy, sampled when the run
starts: torch gets every core of the affinity mask (the forward is ~90% of the work, and a
matmul split over a shared core loses only that core's share), numba gets the cores left free
by others, at least one. On an idle machine that is every core; on a loaded one fewer (one, on
2 cores). A user's NUMBA_NUM_THREADS / OMP_NUM_THREADS (MKL_NUM_THREADS) is kept as given.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SAMPLE_SECONDS = 0.1  # long enough for ~10 scheduler ticks per core, short against a run


def affinity_cores() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) scheduler ticks of `cpus` since boot, from /proc/stat; None elsewhere."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def others_load(cpus: set[int], seconds: float = SAMPLE_SECONDS) -> float:
    """Cores of `cpus` kept busy by other processes: busy ticks over a short window, less this
    process's own CPU time in it. Without /proc/stat, the 1-minute load average (which lags a
    new load and counts this process's recent work, so it errs towards 'busy')."""
    before, own, start = _jiffies(cpus), _own_cpu_seconds(), time.perf_counter()
    if before is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(seconds)
    after = _jiffies(cpus)
    wall = time.perf_counter() - start
    own = (_own_cpu_seconds() - own) / wall
    if after is None or after[1] <= before[1]:
        return 0.0
    busy = (after[0] - before[0]) / (after[1] - before[1]) * len(cpus)
    return max(0.0, busy - own)


def numba_threads_for(cores: int, load: float) -> int:
    """Cores left free by a load of `load` cores, rounded, between 1 and `cores`."""
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def configure_threads(device_type: str) -> dict:
    """Set torch and numba thread counts for an extraction on `device_type`; returns them (and
    what they were chosen from) for the run's manifest."""
    import torch

    cpus = affinity_cores()
    cores = len(cpus)
    chosen: dict = {"cores": cores}
    if not any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        torch.set_num_threads(cores)
    chosen["torch"] = torch.get_num_threads()
    if device_type != "cpu":  # the fused numba pass runs only on the CPU path
        chosen["numba"] = None
        return chosen
    import numba

    if "NUMBA_NUM_THREADS" in os.environ:
        chosen.update(numba=numba.get_num_threads(), rule="NUMBA_NUM_THREADS")
        return chosen
    load = others_load(cpus)
    count = min(numba_threads_for(cores, load), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(count)  # per calling thread: the thread that runs the extraction
    chosen.update(numba=count, others_load=round(load, 2), rule="cores left free by others")
    return chosen


@contextmanager
def thread_split(device_type: str) -> Iterator[dict]:
    """configure_threads for the block, then the previous counts again (a later stage in the
    same process, a popcount say, gets every core back)."""
    import torch

    previous_torch = torch.get_num_threads()
    previous_numba = None
    if device_type == "cpu":
        import numba

        previous_numba = numba.get_num_threads()
    try:
        yield configure_threads(device_type)
    finally:
        torch.set_num_threads(previous_torch)
        if previous_numba is not None:
            import numba

            numba.set_num_threads(previous_numba)
