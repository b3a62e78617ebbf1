"""The embedded default: a BPE tokenizer and tiny GPT-2 models trained locally on the stdlib corpus.

    nwh zoo                 # builds zoo-s0, zoo-s1, zoo-s2 (cached: a second run does nothing)
    nwh zoo --force         # rebuild

Layout (under the storage root):
    models/zoo-tokenizer/           byte-level BPE tokenizer (Hugging Face format)
    models/<name>/step<k>/          checkpoints (safetensors weights + tokenizer files), loadable
                                    with AutoModelForCausalLM / AutoTokenizer.from_pretrained
    models/zoo.json                 manifest: config, corpus sizes, held-out loss per checkpoint,
                                    unigram baseline

Models differ only by seed (initialisation and batch order), like the seed-varied GPT-2 family
used for universal neurons; checkpoints mirror Pythia's `step<k>` revisions. Everything is
deterministic for a given interpreter, library versions and thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import add_arguments, from_args, opt, to_dict
from pipeline.errors import UserError
from pipeline.storage import DEFAULT_ROOT, Storage, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
MANIFEST = "zoo.json"
TOKENIZER_DIR = "zoo-tokenizer"
FORMAT = 2  # bump when the build recipe changes, so cached zoos are rebuilt
CLEAR_MARGIN = 0.5  # nats/token a final checkpoint must gain over the unigram baseline
_NAME = re.compile(r"zoo-[A-Za-z0-9_.-]*?(\d+)")
_STEP_DIR = re.compile(r"step\d+")


@dataclass
class ZooConfig:
    names: list[str] = opt(["zoo-s0", "zoo-s1", "zoo-s2"],
                           help="models to build (zoo-<anything><seed>; the seed is the trailing number)")
    n_layer: int = opt(4, help="transformer blocks")
    d_model: int = opt(128, help="residual width")
    n_head: int = opt(4, help="attention heads")
    d_mlp: int = opt(512, help="MLP neurons per layer")
    n_ctx: int = opt(128, help="context length (tokens per window)")
    vocab_size: int = opt(4096, help="BPE vocabulary size (including <|endoftext|>)")
    steps: int = opt(400, help="optimizer steps per model (the final checkpoint)")
    batch_size: int = opt(8, help="windows per optimizer step")
    lr: float = opt(3e-3, help="peak learning rate (AdamW, linear warm-up, cosine decay)")
    checkpoints: list[int] = opt([0, 16, 64, 256],
                                 help="steps saved as revisions step<k>; the final step is always saved")
    heldout_tokens: int = opt(16384, help="held-out tokens evaluated per checkpoint (evenly "
                              "spaced windows of the held-out stream)")

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.checkpoints = list(self.checkpoints)
        if not self.names:
            raise UserError("--names is empty: give at least one model name such as zoo-s0")
        for name in self.names:
            if not _NAME.fullmatch(name):
                raise UserError(f"zoo model name {name!r} must look like zoo-s<seed>, e.g. zoo-s0")
        if len(set(self.names)) != len(self.names):
            raise UserError(f"--names has duplicates: {' '.join(self.names)}")
        for field in ("n_layer", "d_model", "n_head", "d_mlp", "steps", "batch_size",
                      "heldout_tokens"):
            if getattr(self, field) < 1:
                raise UserError(f"--{field.replace('_', '-')} must be at least 1, got "
                                f"{getattr(self, field)}")
        if self.n_ctx < 2:
            raise UserError(f"--n-ctx must be at least 2, got {self.n_ctx}")
        if self.d_model % self.n_head:
            raise UserError(f"--d-model ({self.d_model}) must be a multiple of --n-head "
                            f"({self.n_head})")
        if self.vocab_size < 258:
            raise UserError(f"--vocab-size must be at least 258 (256 bytes, <|endoftext|> and "
                            f"merges), got {self.vocab_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        bad = [s for s in self.checkpoints if not 0 <= s <= self.steps]
        if bad:
            raise UserError(f"--checkpoints {' '.join(map(str, bad))} lie outside 0..{self.steps} "
                            "(--steps): pass --checkpoints with steps up to --steps")

    @property
    def revision_steps(self) -> list[int]:
        """Saved steps in training order (the final step always included)."""
        return sorted(set(self.checkpoints) | {self.steps})

    @staticmethod
    def seed(name: str) -> int:
        return int(_NAME.fullmatch(name).group(1))

    def config_hash(self) -> str:
        """Identity of a build: the config, the recipe version and the interpreter (the corpus)."""
        key = {"config": to_dict(self), "format": FORMAT, "python": sys.version.split()[0]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- lookups used by model loading


def is_zoo_name(name: str) -> bool:
    """Whether a --model value names a zoo model (zoo-...), rather than a folder or a hub id."""
    return name.startswith("zoo-") and "/" not in name and "\\" not in name


def read_manifest(storage: Storage) -> dict | None:
    path = storage.models_dir() / MANIFEST
    return read_json(path) if path.exists() else None


def zoo_revisions(storage: Storage, name: str) -> list[str]:
    """Revisions of a zoo model in training order (step0 first, the final one last)."""
    manifest = read_manifest(storage)
    if manifest is None:
        raise UserError(f"zoo model {name!r} is not built in {str(storage.root)!r}: run `make zoo` "
                        "(or `nwh zoo --storage ...`) first")
    models = manifest.get("models", {})
    if name not in models:
        raise UserError(f"zoo model {name!r} does not exist in {str(storage.root)!r}: available are "
                        f"{' '.join(models) or 'none'} (run `make zoo ARGS=\"--names {name}\"` "
                        "to build it)")
    return list(models[name]["revisions"])


def zoo_revision_dir(storage: Storage, name: str, revision: str | None) -> Path:
    """Folder of a zoo checkpoint; revision None means the final one."""
    revisions = zoo_revisions(storage, name)
    revision = revision or revisions[-1]
    if revision not in revisions:
        raise UserError(f"zoo model {name!r} has no revision {revision!r}: available are "
                        f"{' '.join(revisions)} (run `make zoo ARGS=\"--checkpoints ...\"` for others)")
    path = storage.models_dir() / name / revision
    if not (path / "config.json").exists():
        raise UserError(f"zoo checkpoint {str(path)!r} is missing: run `make zoo` to rebuild it")
    return path


# -- building blocks


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then rename it onto `target` (replacing it)."""
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    with atomic_path(target) as tmp:
        write(tmp)
        if target.exists():  # a directory cannot be renamed onto a non-empty one
            os.replace(target, trash)
    if trash.exists():
        shutil.rmtree(trash)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) of the texts, as a GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=10**9)


def token_stream(tokenizer, texts: list[str]):
    """The texts tokenized and concatenated, <|endoftext|> after each one (a 1-d int64 tensor)."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, n_ctx: int):
    """Consecutive windows of n_ctx tokens ([n, n_ctx]); the incomplete tail is dropped."""
    n = len(stream) // n_ctx
    return stream[: n * n_ctx].view(n, n_ctx)


def heldout_windows(stream, n_ctx: int, max_tokens: int):
    """At most max_tokens // n_ctx held-out windows, evenly spaced over the held-out stream."""
    import torch

    all_windows = windows(stream, n_ctx)
    if len(all_windows) == 0:
        raise UserError(f"the held-out corpus has fewer than --n-ctx={n_ctx} tokens: lower --n-ctx")
    n = min(len(all_windows), max(1, max_tokens // n_ctx))
    idx = torch.linspace(0, len(all_windows) - 1, n, dtype=torch.float64).round().long()
    return all_windows[idx]


def unigram_loss(train_stream, heldout, vocab: int) -> float:
    """Cross-entropy (nats/token) of add-one smoothed train token frequencies on the held-out
    targets (every window position but the first, as for the models)."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[:, 1:].reshape(-1)].mean())


def heldout_loss(model, heldout, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of a causal LM on held-out windows."""
    import torch

    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(heldout), batch_size):
            batch = heldout[i:i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
            n += batch[:, 1:].numel()
    model.train(was_training)
    return total / n


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def new_model(config: ZooConfig, tokenizer, seed: int):
    """A freshly initialised GPT-2 of the zoo's shape; the same seed gives the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_layer=config.n_layer, n_embd=config.d_model, n_head=config.n_head,
        n_inner=config.d_mlp, n_positions=config.n_ctx, vocab_size=len(tokenizer),
        activation_function="gelu_new", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))


def train_model(config: ZooConfig, name: str, tokenizer, train, heldout, models_dir: Path, *,
                progress: bool = True) -> dict:
    """Train one zoo model, saving each checkpoint; returns its manifest entry."""
    import torch
    from tqdm.auto import tqdm

    seed = config.seed(name)
    model = new_model(config, tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.steps))
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)  # window order of the current epoch
    saved = set(config.revision_steps)
    revisions: list[str] = []
    losses: dict[str, float] = {}
    train_s = eval_s = 0.0
    tokens_per_step = config.batch_size * config.n_ctx
    bar = tqdm(total=config.steps * tokens_per_step, desc=f"train {name}", unit="tok",
               unit_scale=True, disable=not progress, leave=False)
    model.train()
    for step in range(config.steps + 1):
        if step in saved:
            t = time.perf_counter()
            rev = f"step{step}"
            losses[rev] = heldout_loss(model, heldout)

            def write(tmp: Path, model=model) -> None:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)

            _write_dir(models_dir / name / rev, write)
            revisions.append(rev)
            bar.set_postfix(heldout=f"{losses[rev]:.3f}")
            log.debug("%s %s: held-out loss %.4f", name, rev, losses[rev])
            eval_s += time.perf_counter() - t
        if step == config.steps:
            break
        t = time.perf_counter()
        if len(order) < config.batch_size:  # a new epoch: every window once, in a seeded order
            order = torch.cat([order, torch.randperm(len(train), generator=gen)])
        idx, order = order[:config.batch_size], order[config.batch_size:]
        batch = train[idx]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_s += time.perf_counter() - t
        bar.update(tokens_per_step)
    bar.close()
    return {
        "seed": seed, "revisions": revisions, "final_revision": revisions[-1],
        "heldout_loss": losses, "train_seconds": round(train_s, 2),
        "eval_seconds": round(eval_s, 2),
    }


def _is_built(manifest: dict | None, config: ZooConfig, storage: Storage) -> bool:
    if not manifest or manifest.get("config_hash") != config.config_hash():
        return False
    root = storage.models_dir()
    if not (root / TOKENIZER_DIR / "tokenizer.json").exists():
        return False
    for name in config.names:
        info = manifest.get("models", {}).get(name)
        if not info:
            return False
        for rev in info["revisions"]:
            if not all((root / name / rev / f).exists() for f in ("config.json", "model.safetensors")):
                return False
    return True


def _remove_stale_revisions(folder: Path, keep: list[str]) -> None:
    """Drop step<k> folders of an earlier build with other checkpoints."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and _STEP_DIR.fullmatch(p.name) and p.name not in keep:
                shutil.rmtree(p)


def build_zoo(config: ZooConfig, storage: Storage, *, force: bool = False,
              progress: bool = True) -> dict:
    """Build the zoo under storage/models (or reuse an identical build); returns the manifest."""
    storage.ensure_writable()
    manifest = read_manifest(storage)
    if not force and _is_built(manifest, config, storage):
        log.info("zoo %s is already built in %s with this configuration: nothing to do "
                 "(--force rebuilds)", " ".join(config.names), storage.models_dir())
        return manifest

    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(_core_count())
    hf_logging.disable_progress_bar()
    try:
        return _build(config, storage, progress)
    finally:
        torch.set_num_threads(threads)
        hf_logging.enable_progress_bar()


def _build(config: ZooConfig, storage: Storage, progress: bool) -> dict:
    from pipeline.stdlib_corpus import split_documents

    t0 = time.perf_counter()
    root = storage.models_dir()
    # a half-rebuilt zoo must not look built: the manifest is written last
    (root / MANIFEST).unlink(missing_ok=True)
    train_docs, heldout_docs = split_documents("train"), split_documents("heldout")
    log.info("stdlib corpus: %d train and %d held-out documents", len(train_docs),
             len(heldout_docs))
    tokenizer = train_tokenizer(train_docs, config.vocab_size)
    _write_dir(root / TOKENIZER_DIR, tokenizer.save_pretrained)
    train_stream = token_stream(tokenizer, train_docs)
    heldout_stream = token_stream(tokenizer, heldout_docs)
    train = windows(train_stream, config.n_ctx)
    if len(train) < 1:
        raise UserError(f"the train corpus has fewer than --n-ctx={config.n_ctx} tokens")
    heldout = heldout_windows(heldout_stream, config.n_ctx, config.heldout_tokens)
    unigram = unigram_loss(train_stream, heldout, len(tokenizer))
    log.info("tokenizer: %d tokens; %d train tokens, %d held-out tokens (%d evaluated); "
             "unigram held-out loss %.4f", len(tokenizer), len(train_stream),
             len(heldout_stream), heldout.numel(), unigram)
    prep_s = time.perf_counter() - t0
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "config": to_dict(config),
        "config_hash": config.config_hash(),
        "python": sys.version.split()[0],
        "tokenizer": {"path": TOKENIZER_DIR, "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id},
        "corpus": {
            "name": "stdlib",
            "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
            "tokens": {"train": len(train_stream), "heldout": len(heldout_stream),
                       "heldout_evaluated": int(heldout.numel())},
        },
        "unigram_heldout_loss": round(unigram, 4),
        "models": {},
    }
    for name in config.names:
        info = train_model(config, name, tokenizer, train, heldout, root, progress=progress)
        _remove_stale_revisions(root / name, info["revisions"])
        final = info["heldout_loss"][info["final_revision"]]
        info["heldout_loss"] = {k: round(v, 4) for k, v in info["heldout_loss"].items()}
        info["gain_over_unigram"] = round(unigram - final, 4)
        if final > unigram - CLEAR_MARGIN:
            log.warning("%s: final held-out loss %.4f does not beat the unigram baseline %.4f by "
                        "%.1f nats/token: train longer (--steps) or with another --lr",
                        name, final, unigram, CLEAR_MARGIN)
        log.info("%s: held-out loss %s (train %.1f s)", name,
                 " ".join(f"{k}={v:.3f}" for k, v in info["heldout_loss"].items()),
                 info["train_seconds"])
        manifest["models"][name] = info
    manifest["prepare_seconds"] = round(prep_s, 2)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(root / MANIFEST, manifest)
    return manifest


# -- CLI


def register(sub) -> None:
    from pipeline.cli import add_stage_parser

    parser = add_stage_parser(
        sub, "zoo",
        "Build the embedded model zoo: a BPE tokenizer and tiny GPT-2 models (one per seed) "
        "trained on the stdlib corpus, with checkpoints step0 ... final (cached).",
        "  nwh zoo\n"
        "  nwh zoo --names zoo-s0 zoo-s7 --steps 200 --checkpoints 0 10 50\n"
        "  nwh zoo --storage /tmp/wh --force --quiet\n",
    )
    add_arguments(parser, ZooConfig)
    parser.add_argument("--storage", default=str(DEFAULT_ROOT),
                        help=f"warehouse root (default: {DEFAULT_ROOT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical zoo exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    from pipeline.cli import echo

    config = from_args(ZooConfig, args)
    storage = Storage(args.storage)
    manifest = build_zoo(config, storage, force=args.force, progress=not args.quiet)
    echo(f"{'model':<12} {'revision':<10} {'held-out loss (nats/token)':>26}")
    for name in config.names:
        info = manifest["models"][name]
        for rev in info["revisions"]:
            echo(f"{name:<12} {rev:<10} {info['heldout_loss'][rev]:>26.4f}")
    tokens = manifest["corpus"]["tokens"]
    echo(f"{'unigram':<12} {'-':<10} {manifest['unigram_heldout_loss']:>26.4f}")
    echo(f"vocab {manifest['tokenizer']['vocab_size']}, {tokens['train']} train tokens, "
         f"{tokens['heldout_evaluated']} of {tokens['heldout']} held-out tokens evaluated; "
         f"models in {storage.models_dir()}")
    return 0
