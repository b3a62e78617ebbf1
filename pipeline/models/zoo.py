"""The embedded default: a tokenizer and tiny GPT-2 models trained locally on the stdlib corpus.

Built by `nwh zoo` (pipeline/stages/zoo.py); model loading resolves zoo names here.

Layout (under the storage root):
    models/zoo-tokenizer/               byte-level BPE tokenizer (Hugging Face format)
    models/zoo-s<seed>/step<k>/         checkpoints in Hugging Face format (safetensors + tokenizer)
    models/zoo.json                     manifest: config, held-out loss per checkpoint, unigram baseline

Models differ only by seed (initialisation and batch order), like the seed-varied GPT-2 family
used for universal neurons; checkpoints mirror Pythia's `step<k>` revisions.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import config_hash, opt, to_dict
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
MANIFEST = "zoo.json"
TOKENIZER_DIR = "zoo-tokenizer"


@dataclass
class ZooSpec:
    names: list[str] = opt(["zoo-s0", "zoo-s1", "zoo-s2"], help="models to build; the seed is the trailing number")
    n_layer: int = opt(4, help="transformer blocks")
    d_model: int = opt(128, help="residual width")
    n_head: int = opt(4, help="attention heads")
    d_mlp: int = opt(512, help="MLP neurons per layer")
    n_ctx: int = opt(128, help="context length (tokens per training window)")
    vocab_size: int = opt(4096, help="BPE vocabulary size")
    steps: int = opt(500, help="optimizer steps per model (about 90 s each on 2 cores)")
    batch_size: int = opt(8, help="windows per step")
    lr: float = opt(3e-3, help="peak learning rate (AdamW, linear warm-up, cosine decay)")
    checkpoints: list[int] = opt([0, 8, 32, 128], help="steps saved as revisions step<k>; the final step is always saved")
    heldout_tokens: int = opt(16384, help="held-out tokens evaluated per checkpoint")

    def __post_init__(self) -> None:
        for name in self.names:
            if not re.fullmatch(r"zoo-[A-Za-z0-9_-]*?\d+", name):
                raise UserError(f"zoo model name {name!r} must look like zoo-s<seed>, e.g. zoo-s0")
        for field in ("n_layer", "d_model", "n_head", "d_mlp", "n_ctx", "steps", "batch_size",
                      "heldout_tokens"):
            if getattr(self, field) < 1:
                raise UserError(f"--{field.replace('_', '-')} must be at least 1")
        if self.d_model % self.n_head:
            raise UserError("--d-model must be a multiple of --n-head")
        if self.vocab_size < 300:
            raise UserError("--vocab-size must be at least 300 (256 bytes + merges)")
        if any(s < 0 or s > self.steps for s in self.checkpoints):
            raise UserError(f"--checkpoints must lie in 0..{self.steps} (the final step)")
        if self.lr <= 0:
            raise UserError("--lr must be positive")

    @property
    def revisions(self) -> list[int]:
        return sorted(set(self.checkpoints) | {self.steps})

    def seed(self, name: str) -> int:
        return int(re.search(r"(\d+)$", name).group(1))

    def config_hash(self) -> str:
        return config_hash(self)


# -- public lookups used by model loading


def is_zoo_name(name: str) -> bool:
    return name.startswith("zoo-") and "/" not in name


def read_manifest(storage: Storage) -> dict | None:
    path = storage.models_dir() / MANIFEST
    return read_json(path) if path.exists() else None


def zoo_revisions(storage: Storage, name: str) -> list[str]:
    """Revisions of a zoo model in training order."""
    manifest = read_manifest(storage)
    if manifest is None:
        raise UserError(f"zoo model {name!r} is not built in {storage.root}: run `make zoo` "
                        "(or `nwh zoo`) first")
    if name not in manifest["models"]:
        raise UserError(f"zoo model {name!r} does not exist: built are "
                        f"{', '.join(manifest['models'])}")
    return list(manifest["models"][name]["revisions"])


def zoo_revision_dir(storage: Storage, name: str, revision: str | None) -> Path:
    """Folder of a zoo checkpoint; None means the final one."""
    revisions = zoo_revisions(storage, name)
    revision = revision or revisions[-1]
    if revision not in revisions:
        raise UserError(f"zoo model {name!r} has no revision {revision!r}: available are "
                        f"{' '.join(revisions)}")
    return storage.models_dir() / name / revision


# -- building


def _train_tokenizer(config: ZooSpec, texts, directory: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=config.vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                            unk_token=EOS)
    with atomic_path(directory) as tmp:
        tok.save_pretrained(tmp)
    return tok


def _token_stream(tokenizer, texts) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return ids


def _windows(ids: list[int], n_ctx: int):
    import torch

    n = len(ids) // n_ctx
    return torch.tensor(ids[: n * n_ctx], dtype=torch.long).view(n, n_ctx)


def _unigram_loss(train_ids: list[int], heldout, vocab: int) -> float:
    """Cross-entropy (nats/token) of add-one smoothed train frequencies on held-out targets."""
    import torch

    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = heldout[:, 1:].reshape(-1)
    return float(-logp[targets].mean())


def _heldout_loss(model, heldout, batch_size: int = 32) -> float:
    import torch

    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(heldout), batch_size):
            batch = heldout[i:i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            n += batch[:, 1:].numel()
    model.train()
    return total / n


def _save_checkpoint(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _new_model(config: ZooSpec, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        n_layer=config.n_layer, n_embd=config.d_model, n_head=config.n_head,
        n_inner=config.d_mlp, n_positions=config.n_ctx, vocab_size=len(tokenizer),
        activation_function="gelu_new", bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _optimizer(config: ZooSpec, model):
    """AdamW with a linear warm-up over 5% of the steps, then cosine decay to 0."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _train_model(config: ZooSpec, name: str, tokenizer, train, heldout, directory: Path,
                 progress: bool) -> dict:
    """Train one model, saving its checkpoints as directory/step<k>/ (a fresh folder)."""
    import torch
    from tqdm.auto import tqdm

    seed = config.seed(name)
    torch.manual_seed(seed)
    model = _new_model(config, tokenizer)
    optimizer, schedule = _optimizer(config, model)
    gen = torch.Generator().manual_seed(seed)
    revisions, losses = [], {}
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=config.steps, desc=f"train {name}", disable=not progress, unit="step")
    for step in range(config.steps + 1):
        if step in config.revisions:
            rev = f"step{step}"
            losses[rev] = _heldout_loss(model, heldout)
            _save_checkpoint(model, tokenizer, directory / rev)
            revisions.append(rev)
            bar.set_postfix(heldout=f"{losses[rev]:.3f}")
        if step == config.steps:
            break
        batch = train[torch.randint(len(train), (config.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.update(1)
    bar.close()
    return {"seed": seed, "revisions": revisions, "final_revision": revisions[-1],
            "heldout_loss": losses, "train_seconds": round(time.perf_counter() - t0, 2)}


def _is_built(manifest: dict | None, config: ZooSpec, storage: Storage) -> bool:
    """The manifest records this configuration and every checkpoint of it is on disk."""
    return bool(manifest) and manifest.get("config_hash") == config.config_hash() and all(
        name in manifest["models"] and all(
            (storage.models_dir() / name / rev / "config.json").exists()
            for rev in manifest["models"][name]["revisions"])
        for name in config.names)


def _corpus(config: ZooSpec, tokenizer) -> dict:
    """Train windows, the evaluated held-out windows and the unigram baseline on them."""
    from pipeline.core.stdlib_corpus import split_documents

    train_docs, heldout_docs = split_documents("train"), split_documents("heldout")
    train_ids = _token_stream(tokenizer, train_docs)
    heldout_all = _windows(_token_stream(tokenizer, heldout_docs), config.n_ctx)
    heldout = heldout_all[: max(1, config.heldout_tokens // config.n_ctx)]
    return {"train": _windows(train_ids, config.n_ctx), "heldout": heldout,
            "unigram": _unigram_loss(train_ids, heldout, len(tokenizer)),
            "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
            "tokens": {"train": len(train_ids), "heldout_evaluated": int(heldout.numel())}}


def build_zoo(config: ZooSpec, storage: Storage, *, force: bool = False,
              progress: bool = True) -> dict:
    """Build (or reuse) the zoo; returns the manifest.

    A rebuild first removes the manifest (a half-rebuilt zoo reads as not built), then replaces
    the tokenizer folder and each model folder whole (atomic_path: the old folder stays until
    the new one is complete, and no revision of an older configuration survives), and writes the
    manifest last.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from pipeline.core.stdlib_corpus import split_documents

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    storage.ensure_writable()
    manifest = read_manifest(storage)
    if not force and _is_built(manifest, config, storage):
        log.info("zoo is built with this configuration: nothing to do")
        return manifest
    (storage.models_dir() / MANIFEST).unlink(missing_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    tokenizer = _train_tokenizer(config, split_documents("train"),
                                 storage.models_dir() / TOKENIZER_DIR)
    corpus = _corpus(config, tokenizer)
    manifest = {
        "config": to_dict(config), "config_hash": config.config_hash(),
        "vocab_size": len(tokenizer), "documents": corpus["documents"], "tokens": corpus["tokens"],
        "unigram_heldout_loss": round(corpus["unigram"], 4), "models": {},
    }
    for name in config.names:
        with atomic_path(storage.models_dir() / name) as tmp:
            info = _train_model(config, name, tokenizer, corpus["train"], corpus["heldout"], tmp,
                                progress)
        final = info["heldout_loss"][info["final_revision"]]
        if final > corpus["unigram"] - 0.5:
            log.warning("%s: final held-out loss %.3f does not clearly beat the unigram %.3f",
                        name, final, corpus["unigram"])
        info["heldout_loss"] = {k: round(v, 4) for k, v in info["heldout_loss"].items()}
        manifest["models"][name] = info
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(storage.models_dir() / MANIFEST, manifest)
    return manifest
