"""Orchestration: chains of stages written in one place (the checkpoint sweep).

    nwh dormancy-sweep --model zoo-s0                       # every zoo checkpoint
    nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped --revisions "step0 step1000 step143000"

Stages never call each other; a flow runs several of them in order. Each stage skips the work
it has finished (extract and dormancy leave completion markers), so a rerun of a sweep, or of
a killed one, does only what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.core.config import (
    ModelOptions,
    Progress,
    Stage,
    WindowOptions,
    config_hash,
    opt,
    to_dict,
)
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, slug
from pipeline.stages import dormancy, extract

log = logging.getLogger(__name__)

_REVISION_HELP = ModelOptions.__dataclass_fields__["revision"].metadata["help"]


@dataclass(kw_only=True)
class SweepConfig(ModelOptions, WindowOptions, Progress):
    revision: str | None = opt(None, help=_REVISION_HELP, cli=False)  # --revisions instead
    revisions: str | None = opt(None, help="space-separated revisions, e.g. 'step0 step1000' "
                                "(default: every checkpoint of a zoo or local model)")
    threshold: float = opt(0.1, help="tau: dormant iff score <= tau (definition tau)")
    definition: str = opt("tau", help="tau, never_active or max_abs",
                          choices=dormancy.DEFINITIONS)
    epsilon: float = opt(1e-6, help="max_abs: dormant iff max |a| <= epsilon")
    log_file: str | None = opt(None, help="CSV log every checkpoint is appended to (default "
                               "reports/dormancy-sweep_<model>/ under the storage root)")
    log_mode: str = opt("append", help="append, or write the log anew before the first checkpoint",
                        choices=dormancy.LOG_MODES)

    def __post_init__(self) -> None:
        self.check_windows()
        dormancy.check_dormancy_options(self.definition, self.threshold, self.epsilon,
                                        self.log_mode)


@dataclass
class SweepResult:
    rows: pl.DataFrame   # dormancy rows of every checkpoint, in sweep order
    log_file: Path
    runs: list[str]      # the extraction run of each checkpoint


def sweep_revisions(storage: Storage, model: str, revisions: str | None) -> list[str]:
    """The checkpoints to sweep: as given, or every revision of a zoo or local model."""
    if revisions:
        return revisions.split()
    from pipeline.models.zoo import is_zoo_name, zoo_revisions

    if is_zoo_name(model):
        return zoo_revisions(storage, model)
    root = Path(model)
    if root.is_dir():
        found = [p.name for p in root.iterdir() if (p / "config.json").exists()]
        if found:
            step = dormancy.parse_step
            return sorted(found, key=lambda r: (step(r) is None, step(r) or 0, r))
    raise UserError(f"model {model!r} has no local checkpoints to sweep: pass --revisions, e.g. "
                    "'step0 step1000 step143000'")


def checkpoint_config(config: SweepConfig, revision: str) -> extract.ExtractConfig:
    """The extraction of one checkpoint: the sweep's model and window options, passed through."""
    shared = [f.name for cls in (ModelOptions, WindowOptions, Progress)
              for f in dataclasses.fields(cls)]
    values = {name: getattr(config, name) for name in shared}
    checkpoint = extract.ExtractConfig(**{**values, "revision": revision})
    return dataclasses.replace(checkpoint, run=slug(
        checkpoint.run_id, f"n{config.num_samples}x{config.max_length}"))


def run_sweep(config: SweepConfig, storage: Storage) -> SweepResult:
    """Extract every checkpoint (resumable; skipped when finished) and log its dormancy."""
    revisions = sweep_revisions(storage, config.model, config.revisions)
    dormancy.check_revisions(storage, config.model, revisions)  # all of them, before any work
    log_file = Path(config.log_file) if config.log_file else dormancy.default_log_file(
        storage, slug("dormancy-sweep", Path(config.model).name), config.model)
    frames, runs = [], []
    for i, revision in enumerate(revisions):
        extracted = extract.run(checkpoint_config(config, revision), storage)
        result = dormancy.run(dormancy.DormancyConfig(
            run=extracted.run_id, threshold=config.threshold, definition=config.definition,
            epsilon=config.epsilon, log_file=str(log_file), revision=revision,
            log_mode="write" if i == 0 and config.log_mode == "write" else "append"), storage)
        frames.append(result.rows)
        runs.append(extracted.run_id)
        log.info("%s %s: %.2f%% dormant on average", config.model, revision,
                 result.rows["pct_dormant"].mean())
    # written last: the finished sweep (a rerun skips the extractions and logs dormancy anew)
    storage.marker(slug("dormancy-sweep", Path(config.model).name), "dormancy-sweep").write(
        to_dict(config), config_hash(config, revisions=revisions), runs=runs,
        log_file=str(log_file))
    return SweepResult(pl.concat(frames), log_file, runs)


def show_sweep(result: SweepResult) -> str:
    return dormancy.format_rows(result.rows, result.log_file)


STAGES = [Stage(
    "dormancy-sweep", "Extract every checkpoint of a model and log its dormancy.",
    "  nwh dormancy-sweep --model zoo-s0 --log-file zoo_s0.csv\n"
    "  nwh dormancy-sweep --model EleutherAI/pythia-70m-deduped \\\n"
    "      --revisions 'step0 step1000 step143000' --corpus wikitext --num-samples 500\n",
    SweepConfig, run_sweep, show_sweep)]
