"""Stage `zoo`: build the embedded model zoo (tokenizer + tiny GPT-2 models with checkpoints).

    nwh zoo                 # builds zoo-s0, zoo-s1, zoo-s2 (cached: a second run does nothing)
    nwh zoo --force         # rebuild

The zoo itself (its spec, training, layout and lookups) is pipeline/models/zoo.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import Progress, Stage, opt
from pipeline.core.storage import Storage
from pipeline.models.zoo import ZooSpec, build_zoo


@dataclass(kw_only=True)
class ZooConfig(ZooSpec, Progress):
    force: bool = opt(False, help="rebuild even if cached", hash=False)


def run(config: ZooConfig, storage: Storage) -> dict:
    """Build (or reuse) the zoo; returns its manifest (models/zoo.json)."""
    return build_zoo(config, storage, force=config.force, progress=config.progress)


def show(manifest: dict) -> str:
    lines = [f"{'model':<10} {'revision':<10} held-out loss (nats/token)"]
    for name, info in manifest["models"].items():
        for rev in info["revisions"]:
            lines.append(f"{name:<10} {rev:<10} {info['heldout_loss'][rev]:.4f}")
    lines.append(f"unigram baseline: {manifest['unigram_heldout_loss']:.4f} nats/token "
                 f"({manifest['tokens']['train']} train tokens, vocab {manifest['vocab_size']})")
    return "\n".join(lines)


STAGES = [Stage(
    "zoo", "Build the embedded model zoo (tokenizer + tiny GPT-2 models with checkpoints).",
    "  nwh zoo\n  nwh zoo --names zoo-s0 zoo-s7 --steps 300\n  nwh zoo --force\n",
    ZooConfig, run, show)]
