"""Loading a model by zoo name, local folder or hub id, with its tokenizer and adapter."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.models.adapters import Adapter, NeuronSite, adapter_for

log = logging.getLogger(__name__)

ENCODER_FAMILIES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    sites: list[NeuronSite]
    name: str                  # as the user gave it
    revision: str | None       # resolved checkpoint (zoo: the folder name)
    source: str                # zoo, local or hub
    path: Path | None          # local folder, if any
    device: torch.device
    dtype: torch.dtype
    is_causal: bool

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.sites]

    @property
    def layer_offsets(self) -> list[int]:
        """neuron_id of neuron 0 of each layer (global ids are layer-major)."""
        offsets, total = [], 0
        for w in self.widths:
            offsets.append(total)
            total += w
        return offsets


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available here: use --device cpu or auto")
        try:
            return torch.device(spec)
        except RuntimeError:
            raise UserError(f"--device {spec!r} is not a valid device: use cuda or cuda:N") from None
    raise UserError(f"--device {spec!r} is unknown: use auto, cpu, cuda or cuda:N")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    spec = (spec or "auto").lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in _DTYPES:
        raise UserError(f"--dtype {spec!r} is unknown: use auto, float32, float16 or bfloat16")
    return _DTYPES[spec]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def _local_dir(name: str, revision: str | None) -> tuple[Path, str | None]:
    root = Path(name).expanduser()
    if revision and (root / revision / "config.json").exists():
        return root / revision, revision
    if (root / "config.json").exists():
        if revision and any((p / "config.json").exists() for p in root.iterdir() if p.is_dir()):
            raise UserError(f"model folder {name!r} has no revision {revision!r}: available are "
                            f"{_revisions(root)}")
        return root, revision
    available = _revisions(root)
    if available:
        if revision:
            raise UserError(f"model folder {name!r} has no revision {revision!r}: available are "
                            f"{available}")
        raise UserError(f"model folder {name!r} holds revisions {available}: pass --revision")
    raise UserError(f"model folder {name!r} has no config.json: pass a folder in Hugging Face "
                    "format (save_pretrained)")


def _revisions(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


def load_model(
    name: str, revision: str | None = None, *, storage: Storage, device: str = "auto",
    dtype: str = "auto", trust_remote_code: bool = False, for_generation: bool = True,
) -> LoadedModel:
    """Load a model (eval mode) with tokenizer and adapter; bad names give a one-line UserError."""
    from pipeline.models import zoo

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if zoo.is_zoo_name(name):
        path, source = zoo.zoo_revision_dir(storage, name, revision), "zoo"
        revision = path.name
    elif Path(name).expanduser().is_dir():
        (path, revision), source = _local_dir(name, revision), "local"
    elif not _is_hub_id(name):
        raise UserError(f"model {name!r} is not a folder, a zoo name or a hub id: check the path "
                        "(or run `make zoo` for the zoo-s0/1/2 models)")
    else:
        path, source = None, "hub"
    where = str(path) if path else name
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source == "hub":
        kwargs["revision"] = revision
    try:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our stages show their own progress
        hf_logging.set_verbosity_error()

        config = AutoConfig.from_pretrained(where, **kwargs)
        model_cls = _model_class(config)
        model = model_cls.from_pretrained(where, dtype=torch_dtype,
                                          use_safetensors=True if path else None, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not loadable"
        raise _load_error(name, revision, source, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(dev).eval()
    adapter = adapter_for(model)
    causal = adapter.causal and not getattr(config, "is_encoder_decoder", False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter,
                       sites=adapter.sites(model), name=name, revision=revision, source=source,
                       path=path, device=dev, dtype=torch_dtype, is_causal=causal)


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if config.model_type in ENCODER_FAMILIES and not getattr(config, "is_decoder", False):
        try:
            AutoModelForMaskedLM._model_mapping[type(config)]  # noqa: B018 - mapping lookup
            return AutoModelForMaskedLM
        except KeyError:
            return AutoModel
    return AutoModelForCausalLM


def _load_error(name: str, revision: str | None, source: str, e: Exception) -> UserError:
    text = " ".join(str(e).split())
    if source == "hub":
        if revision and ("revision" in text.lower() or "git identifier" in text.lower()):
            return UserError(f"model {name!r} has no revision {revision!r} on the hub (or it is "
                             "not cached): check the revision name")
        return UserError(f"model {name!r} is not available: the hub is unreachable (offline) and "
                         "it is not cached; pass a local folder with --model ./path or a zoo name "
                         "(make zoo)")
    return UserError(f"model {name!r} could not be loaded from {source} folder ({text[:200]}): "
                     "check that it is a Hugging Face model folder with safetensors weights")
