"""Shards of a stage's input, and running them as Ray tasks.

    nwh extract --model gpt2 --num-samples 65536 --shard 3/8      # one shard, any scheduler
    nwh extract --model gpt2 --num-samples 65536 --ray --shards 8  # all of them on Ray

A shard is a contiguous, deterministic slice of a stage's work units (batches of corpus
windows, prompts, layer pairs): `Shard.parse("i/n")` and `split_units` decide it from the
input alone, so any process that runs shard i of n, on any machine, does the same work. Ray is
an optional extra (`pip install -e '.[ray]'`); `run_tasks` starts or joins a cluster, runs one
task per shard (one GPU each where the cluster has GPUs), shows each shard's progress from a
poll function the caller gives (stages report progress through what they commit, so this works
the same for any storage root), and lets Ray retry a task whose worker died: the retried task
resumes from the shard's last commit.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: start a cluster in this process
RETRIES = 3      # retries of a task whose worker died (Ray's max_retries)
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, flag: str = "--shard") -> Shard:
        try:
            i, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise UserError(f"{flag} {text!r} is not i/n: give the shard's 0-based index and "
                            "the number of shards, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise UserError(f"{flag} {text!r}: the index must be in 0..n-1 and n at least 1, "
                            "e.g. 0/4 ... 3/4")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """A file-name form, e.g. 'shard-2-of-4'."""
        return f"shard-{self.index}-of-{self.count}"


def split_units(units: int, count: int, align: int = 1) -> list[tuple[int, int]]:
    """`count` contiguous [start, stop) slices of range(units), as even as whole groups of
    `align` units allow (every boundary but the last is a multiple of `align`): the same
    answer wherever it is computed. Shards past the work are empty."""
    if count < 1 or align < 1:
        raise ValueError("count and align must be positive")
    groups = -(-units // align)
    bounds = [min(units, (k * groups // count) * align) for k in range(count + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(count)]


def split_weighted(weights: Sequence[int], count: int) -> list[tuple[int, int]]:
    """`count` contiguous [start, stop) slices of range(len(weights)) with sums as even as
    whole units allow (a unit goes to the slice its midpoint falls in)."""
    total = sum(weights)
    bounds, acc, k = [0], 0, 1
    for i, w in enumerate(weights):
        mid = acc + w / 2
        while k < count and mid >= k * total / count:
            bounds.append(i)
            k += 1
        acc += w
    bounds += [len(weights)] * (count + 1 - len(bounds))
    return [(bounds[k], bounds[k + 1]) for k in range(count)]


def ray_module():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address` ('auto', 'ray://host:10001', host:port) or, for LOCAL or
    None, start one in this process (on this machine's cores, or `num_cpus`)."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  configure_logging=False)
    # the package the tasks import is this process's: workers of a local cluster start with
    # its path, remote ones need it installed (or a runtime_env the caller sets up)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster on 127.0.0.1 only
    try:
        if address in (None, LOCAL):
            # address "local": always a new cluster, never one that `ray start` left running
            # on this machine (which a bare ray.init() would join)
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {address!r} ({e}): start it with "
                        "`ray start --head`, or pass --ray alone for a local one") from None
    return ray


def task_root(root: str | os.PathLike) -> str:
    """A storage root as a task sees it: a local path made absolute (a worker's working folder
    need not be the driver's), a URL (s3://...) as it is."""
    text = os.fspath(root)
    return text if "://" in text else os.path.abspath(text)


def resolve_on_workers(fn: Callable[..., Any], *args: Any, address: str | None,
                       device: str = "cpu") -> Any:
    """fn(*args) in one task with the resources of a stage's tasks: what a value resolves to
    where the tasks run (the dtype of --device auto on a GPU worker led by a CPU driver)."""
    return run_tasks(fn, [(args, {})], address=address, device=device, desc="resolve",
                     progress=False)[0]


def slots(ray, device: str) -> int:
    """Tasks the cluster runs at once: one per GPU where the stage may use them, else one per
    CPU (a stage's default number of shards)."""
    resources = ray.cluster_resources()
    if device != "cpu" and resources.get("GPU", 0) >= 1:
        return int(resources["GPU"])
    return max(1, int(resources.get("CPU", 1)))


def task_resources(ray, device: str, tasks: int) -> dict[str, float]:
    """One GPU per task where the cluster has GPUs and the stage runs on them; otherwise an
    even share of the cluster's CPUs (at least one)."""
    resources = ray.cluster_resources()
    if device != "cpu" and resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = resources.get("CPU", 1)
    return {"num_cpus": max(1, int(cpus // max(1, min(tasks, cpus))))}


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], *,
              address: str | None, device: str = "cpu", desc: str = "shards",
              poll: Callable[[], Sequence[tuple[int, int]]] | None = None,
              progress: bool = True, retries: int = RETRIES,
              resources: dict[str, float] | None = None) -> list[Any]:
    """Run fn(*args, **kwargs) of every call as a Ray task; results in call order.

    `resources`: more of Ray's task options, e.g. {"memory": bytes} so that a node runs only
    as many tasks at once as its memory holds.

    `poll()` returns (done, total) per call (read from what the tasks committed) and draws one
    progress bar per task. A task whose worker process dies is retried up to `retries` times
    by Ray; an exception raised by `fn` (a UserError, a bug) is not retried: it is raised here
    as soon as it happens, and the tasks still running are cancelled (what they committed
    stays, so the same command resumes).
    """
    ray = connect(address)
    options = {**task_resources(ray, device, len(calls)), **(resources or {}),
               "max_retries": retries, "retry_exceptions": False}
    remote = ray.remote(fn).options(**options)
    futures = [remote.remote(*args, **kwargs) for args, kwargs in calls]
    log.info("%d %s on Ray (%s per task)", len(futures), desc,
             ", ".join(f"{k}={v}" for k, v in options.items() if k.startswith("num_") or k == "memory"))
    bars = _bars(len(calls), desc) if progress and poll else []
    pending = list(futures)
    try:
        while pending:
            # return as soon as any task ends, so a failed one is raised at once
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            _raise_failure(ray, ready)
            if bars:
                _draw(bars, _safe_poll(poll))
        if bars:
            _draw(bars, _safe_poll(poll))
        return ray.get(futures)
    finally:
        for ref in pending:  # an error (or ^C) in the driver: stop the tasks it started
            ray.cancel(ref, force=True)
        for bar in bars:
            bar.close()


def _raise_failure(ray, ready: list) -> None:
    """Raise the exception of the first failed task among `ready`: a UserError as the task
    raised it (its one line, not the remote traceback), a dead worker beyond its retries as a
    UserError, anything else with Ray's remote traceback."""
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise e.as_instanceof_cause() from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                ray.exceptions.NodeDiedError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"a task's worker died more often than its retries allow ({first}): "
                            "committed work is kept; free memory (or give the task less) and "
                            "run the same command again") from None


def _safe_poll(poll: Callable[[], Sequence[tuple[int, int]]]) -> Sequence[tuple[int, int]]:
    """The progress of every task, or none this time when reading it failed (a file being
    replaced as it is read): progress is never a reason to stop a run."""
    try:
        return poll()
    except Exception as e:  # noqa: BLE001 - progress must not end the run
        log.debug("progress poll failed: %s", e)
        return []


def _bars(n: int, desc: str) -> list:
    from tqdm.auto import tqdm

    return [tqdm(total=0, position=i, desc=f"{desc} {i}/{n}", unit="tok", unit_scale=True,
                 leave=True) for i in range(n)]


def _draw(bars: list, states: Sequence[tuple[int, int]]) -> None:
    for bar, (done, total) in zip(bars, states):
        if bar.total != total:
            bar.reset(total=total)  # the shard started: its rate counts from now
        bar.n = done
        bar.refresh()


def wait_for(check: Callable[[], bool], seconds: float, step: float = 0.05) -> bool:
    """Poll `check` until it holds or `seconds` pass (for callers that wait on other shards)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step)
    return check()
