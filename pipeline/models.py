"""Loading a model by zoo name, local folder or hub id, with its tokenizer, adapter and sites.

    load_model("zoo-s0", "step200", storage=storage)          # storage/models/zoo-s0/step200
    load_model("./my-model", storage=storage)                  # a save_pretrained folder
    load_model("EleutherAI/pythia-70m-deduped", "step1000", storage=storage)  # hub or its cache

Weights load through safetensors (always for local folders; on the hub transformers prefers
them and falls back to its weights-only loader); `trust_remote_code` is off unless asked.
Every failure is a one-line UserError that names the model and the fix.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.adapters import FAMILIES, Adapter, NeuronSite, adapter_for
from pipeline.config import opt
from pipeline.errors import UserError
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    """The model options every model-loading stage shares (copy these fields into a config)."""

    model: str = opt(help="model to load: a zoo name (zoo-s0; build with `make zoo`), a local "
                          "folder in Hugging Face format (./my-model) or a hub id "
                          "(gpt2, EleutherAI/pythia-70m-deduped; needs the hub or its cache)")
    revision: str | None = opt(None, help="checkpoint: a zoo revision (zoo-s0 --revision step200; "
                                          "default: the final one), a hub branch/tag/commit "
                                          "(EleutherAI/pythia-70m-deduped --revision step1000) or "
                                          "a subfolder of a local model folder")
    device: str = opt("auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = opt("auto", help="auto (float32 on CPU, bfloat16 on CUDA where supported, else "
                                  "float16), float32, float16 or bfloat16")
    trust_remote_code: bool = opt(False, help="run the model repository's own Python code "
                                              "(only for hub models you trust)")

    def load(self, storage: Storage, **kwargs: Any) -> LoadedModel:
        return load_model(self.model, self.revision, storage=storage, device=self.device,
                          dtype=self.dtype, trust_remote_code=self.trust_remote_code, **kwargs)


@dataclass
class LoadedModel:
    model: torch.nn.Module     # eval mode, on `device` in `dtype`
    tokenizer: Any
    adapter: Adapter
    sites: list[NeuronSite]
    name: str                  # as the user gave it
    revision: str | None       # resolved checkpoint (zoo: the folder name)
    source: str                # "zoo", "local" or "hub"
    path: Path | None          # local folder, if any
    device: torch.device
    dtype: torch.dtype
    is_causal: bool            # False for bidirectional (BERT-style) encoders
    n_layers: int
    widths: list[int]          # d_mlp of each layer

    @property
    def layer_offsets(self) -> list[int]:
        """neuron_id of neuron 0 of each layer (global ids are layer-major)."""
        offsets, total = [], 0
        for w in self.widths:
            offsets.append(total)
            total += w
        return offsets

    @property
    def n_neurons(self) -> int:
        return sum(self.widths)


# -- device and dtype


def resolve_device(spec: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> torch.device (auto picks CUDA when available)."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise UserError(f"--device {spec!r} is unknown: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine: use "
                        "--device cpu (or auto)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(text)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto | float32 | float16 | bfloat16 -> torch.dtype (auto: fp32 on CPU, bf16/fp16 on CUDA)."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32  # reduced precision is much slower than fp32 on CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if text not in _DTYPES:
        raise UserError(f"--dtype {spec!r} is unknown: use auto, float32, float16 or bfloat16")
    return _DTYPES[text]


# -- where the model comes from

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def _has_config(path: Path) -> bool:
    return (path / "config.json").is_file()


def _revisions(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _has_config(p))


def _local_dir(name: str, revision: str | None) -> tuple[Path, str | None]:
    """The model folder of a local path: `<dir>/<revision>` if it exists, else `<dir>`."""
    root = Path(name).expanduser()
    if revision and _has_config(root / revision):
        return root / revision, revision
    available = _revisions(root)
    if _has_config(root):
        if revision and available:
            raise UserError(f"model folder {name!r} has no revision {revision!r}: available are "
                            f"{', '.join(available)}")
        return root, revision  # a plain folder: the revision is only recorded
    if available:
        if revision:
            raise UserError(f"model folder {name!r} has no revision {revision!r}: available are "
                            f"{', '.join(available)}")
        raise UserError(f"model folder {name!r} holds revisions {', '.join(available)}: pass "
                        "--revision")
    raise UserError(f"model folder {name!r} has no config.json: pass a folder in Hugging Face "
                    "format (written by save_pretrained)")


def _check_safetensors(path: Path, name: str) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    found = f" (found {', '.join(sorted(pickles)[:3])})" if pickles else ""
    raise UserError(f"model folder {name!r} has no safetensors weights{found}: pickled weights "
                    "are never loaded; re-save it with save_pretrained(safe_serialization=True)")


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (the hub library reads them at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _model_class(config):
    """AutoModelForCausalLM for decoders; AutoModelForMaskedLM (else AutoModel) for encoders."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    archs = list(getattr(config, "architectures", None) or [])
    spec = FAMILIES.get(config.model_type)
    is_encoder = spec is not None and not spec.causal and not getattr(config, "is_decoder", False)
    if not is_encoder or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return AutoModelForCausalLM
    if type(config) in AutoModelForMaskedLM._model_mapping:
        return AutoModelForMaskedLM
    return AutoModel


def load_model(
    name: str, revision: str | None = None, *, storage: Storage, device: str = "auto",
    dtype: str = "auto", trust_remote_code: bool = False, for_generation: bool = True,
) -> LoadedModel:
    """Load a model in eval mode with its tokenizer, adapter and neuron sites.

    `name` is a zoo name, an existing local folder or a hub id (see ModelOptions).
    `for_generation=False` turns the KV cache off (a single forward for extraction needs none);
    the LM head is always loaded, since weight analyses need the unembedding.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path, source = _locate(name, revision, storage)
    if source == "zoo":
        revision = path.name
    elif source == "local":
        path, revision = _local_dir(name, revision)
        _check_safetensors(path, name)
    where = str(path) if path is not None else name
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source == "hub":
        kwargs["revision"] = revision
        if _offline():
            kwargs["local_files_only"] = True
    try:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the stages show their own progress
        hf_logging.set_verbosity_error()
        config = AutoConfig.from_pretrained(where, **kwargs)
        adapter = adapter_for(config)  # an unsupported family fails before the weights load
        model = _model_class(config).from_pretrained(
            where, config=config, use_safetensors=True if path is not None else None,
            **{_dtype_kwarg(): torch_dtype}, **kwargs)
        tokenizer = _tokenizer(AutoTokenizer, where, path, kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not loadable"
        raise _load_error(name, revision, source, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(dev).eval()  # already in torch_dtype (modules kept in fp32 by design stay so)
    if not for_generation and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    sites = adapter.sites(model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=adapter, sites=sites, name=name,
        revision=revision, source=source, path=path, device=dev, dtype=torch_dtype,
        is_causal=adapter.causal or bool(getattr(model.config, "is_decoder", False)),
        n_layers=len(sites), widths=[s.width for s in sites])


def _locate(name: str, revision: str | None, storage: Storage) -> tuple[Path | None, str]:
    from pipeline import zoo

    if zoo.is_zoo_name(name):
        return zoo.zoo_revision_dir(storage, name, revision), "zoo"
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser(), "local"
    if name.startswith((".", "/", "~")) or not _is_hub_id(name):
        raise UserError(f"model {name!r} is not a folder, a zoo name or a hub id: check the path "
                        "(or run `make zoo` and pass a zoo name such as zoo-s0)")
    return None, "hub"


def _tokenizer(auto, where: str, path: Path | None, kwargs: dict):
    try:
        return auto.from_pretrained(where, **kwargs)
    except (OSError, ValueError):
        # a revision subfolder may keep its tokenizer one level up, beside the revisions
        if path is not None and _has_config(path) and (path.parent / "tokenizer_config.json").exists():
            return auto.from_pretrained(str(path.parent), **kwargs)
        raise


def _revision_missing(e: BaseException) -> bool:
    while e is not None:
        if type(e).__name__ == "RevisionNotFoundError":
            return True
        text = str(e).lower()
        if "valid git identifier" in text or "revision not found" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_error(name: str, revision: str | None, source: str, e: Exception) -> UserError:
    text = " ".join(str(e).split())
    rev = f" (revision {revision!r})" if revision else ""
    if "trust_remote_code" in text:
        return UserError(f"model {name!r}{rev} needs its repository's own code: pass "
                         "--trust-remote-code if you trust it")
    if source == "hub":
        if revision and _revision_missing(e):
            return UserError(f"model {name!r} has no revision {revision!r} on the hub: check the "
                             "branch, tag or commit name")
        return UserError(f"model {name!r}{rev} is not available offline and not cached (the hub "
                         "is unreachable or does not know it): pass a local folder with --model "
                         "./path or a zoo name such as zoo-s0 (`make zoo`)")
    return UserError(f"model {name!r}{rev} could not be loaded from its {source} folder "
                     f"({type(e).__name__}: {text[:200]}): check that it is a Hugging Face model "
                     "folder with safetensors weights")
