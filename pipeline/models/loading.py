"""Loading a model by zoo name, local folder or hub id, with its tokenizer and adapter."""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage
from pipeline.models.adapters import Adapter, NeuronSite, adapter_for, config_is_causal, family_spec

log = logging.getLogger(__name__)


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
    # weights the checkpoint did not hold, randomly initialised at load (transformers'
    # missing keys): a base-model folder loaded with an LM head leaves the head's here
    missing_weights: tuple[str, ...] = ()

    @property
    def missing_head_weights(self) -> list[str]:
        """The missing weights outside the trunk (base_model_prefix): those of the LM or
        masked-LM head, so a loss through the head would be that of random weights."""
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        return sorted(k for k in self.missing_weights if not k.startswith(prefix))

    def require_head(self, purpose: str) -> None:
        """A one-line UserError unless the model has a head whose weights all loaded."""
        head, cls = ("LM", "ForCausalLM") if self.is_causal else ("masked-LM", "ForMaskedLM")
        if self.model.get_output_embeddings() is None:
            raise UserError(f"model {self.name!r} has no {head} head, which {purpose} needs: "
                            f"use a checkpoint of a ...{cls} model")
        missing = self.missing_head_weights
        if missing:
            named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                              else "")
            raise UserError(f"model {self.name!r} does not ship the weights of its {head} head "
                            f"({named} would be random), which {purpose} needs: use a "
                            f"checkpoint saved with its head (a ...{cls} folder)")

    def require_dense(self, purpose: str) -> None:
        """A one-line UserError for a mixture-of-experts model: its neurons are computed inside
        the fused experts, where no hook edits or differentiates them one by one."""
        if self.adapter.moe:
            raise UserError(f"model {self.name!r} is a mixture of experts ({self.adapter.family}),"
                            f" whose neurons live inside fused expert weights: {purpose} supports"
                            " dense models only (extraction, co-activation, graphs and dormancy"
                            " support mixtures of experts)")

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


def dtype_name(device: str, dtype: str) -> str:
    """The resolved torch dtype of --device/--dtype, by name (float32, bfloat16...): what a
    result depends on, so stages put it in their config hash."""
    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def _local_dir(name: str, revision: str | None) -> tuple[Path, str | None]:
    root = Path(name).expanduser()
    if revision and (root / revision / "config.json").exists():
        return root / revision, revision
    available = _revisions(root)
    if revision:  # never label a run with a revision the folder does not hold
        held = f"available are {available}" if available else "it holds no revisions (no " \
            "subfolder with a config.json): drop --revision"
        raise UserError(f"model folder {name!r} has no revision {revision!r}: {held}")
    if (root / "config.json").exists():
        return root, None
    if available:
        raise UserError(f"model folder {name!r} holds revisions {available}: pass --revision")
    raise UserError(f"model folder {name!r} has no config.json: pass a folder in Hugging Face "
                    "format (save_pretrained)")


def _revisions(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


def load_model(
    name: str, revision: str | None = None, *, storage: Storage, device: str = "auto",
    dtype: str = "auto", trust_remote_code: bool = False, for_generation: bool = True,
) -> LoadedModel:
    """Load a model (eval mode) with tokenizer and adapter; bad names give a one-line UserError.

    The config is read first and the adapter resolved from it, so an unsupported family is
    refused before any weights load."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    missing: tuple[str, ...] = ()
    if str(name).lower().endswith(".gguf"):  # llama.cpp / Ollama files, dequantized
        from pipeline.models.gguf import load_gguf

        if revision:
            raise UserError(f"--revision {revision!r} with the GGUF file {name!r}: a GGUF file "
                            "holds one checkpoint; drop --revision")
        path, source = Path(name).expanduser(), "gguf"
        model, tokenizer = load_gguf(path, device=dev, dtype=torch_dtype)
        config, adapter = model.config, adapter_for(model)
    else:
        model, tokenizer, config, adapter, path, revision, source, missing = _load_pretrained(
            name, revision, storage, torch_dtype, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(dev).eval()
    causal = (adapter.causal or bool(getattr(config, "is_decoder", False))) \
        and not getattr(config, "is_encoder_decoder", False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter,
                       sites=adapter.sites(model), name=name, revision=revision, source=source,
                       path=path, device=dev, dtype=torch_dtype, is_causal=causal,
                       missing_weights=missing)


def _load_pretrained(name: str, revision: str | None, storage: Storage, torch_dtype,
                     trust_remote_code: bool):
    """(model, tokenizer, config, adapter, path, revision, source, missing weights) of a zoo
    name, a local folder or a hub id; the adapter is resolved from the config before the
    weights load."""
    from pipeline.models import zoo

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
        offline = _hub_offline_reason()
        if offline:  # fail at once instead of retrying the hub, and never ask it again
            if not _hub_cached(name, revision):
                raise _offline_error(name, revision, offline)
            kwargs["local_files_only"] = True
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our stages show their own progress
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        spec = family_spec(config)
        causal = spec.causal if spec else config_is_causal(config)
        model_cls = _model_class(config, causal)
        # a family without an entry is mapped on an empty skeleton (meta device: no memory)
        adapter = Adapter(config.model_type, spec) if spec else adapter_for(
            _skeleton(model_cls, config, trust_remote_code))
        model, info = model_cls.from_pretrained(where, dtype=torch_dtype, output_loading_info=True,
                                                use_safetensors=True if path else None, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not loadable"
        raise _load_error(name, revision, source, e) from None
    missing = tuple(sorted(info.get("missing_keys") or ()))
    return model, tokenizer, config, adapter, path, revision, source, missing

def _model_class(config, causal: bool):
    from transformers import (
        MODEL_FOR_MASKED_LM_MAPPING,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
    )

    if causal or getattr(config, "is_decoder", False):
        return AutoModelForCausalLM
    return AutoModelForMaskedLM if type(config) in MODEL_FOR_MASKED_LM_MAPPING else AutoModel


def _skeleton(model_cls, config, trust_remote_code: bool) -> torch.nn.Module:
    with torch.device("meta"):
        return model_cls.from_config(config, trust_remote_code=trust_remote_code)


HUB_PROBE_TIMEOUT_S = 2.0  # a reachable hub answers a HEAD in well under a second


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be asked (HF_HUB_OFFLINE set, or no answer), None when it can."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "")
    if constants.HF_HUB_OFFLINE or env.upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    return _hub_unreachable()


@functools.cache  # once a process: a dead network does not come back within a run
def _hub_unreachable() -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any transport failure means the hub cannot be reached
        return f"{constants.ENDPOINT} does not answer"
    return None


def _hub_cached(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)


def _offline_error(name: str, revision: str | None, reason: str, *, partly: bool = False
                   ) -> UserError:
    from huggingface_hub import constants

    what = f"model {name!r}" + (f" at revision {revision!r}" if revision else "")
    cached = "is only partly cached" if partly else "is not cached"
    return UserError(f"{what} {cached} in {constants.HF_HUB_CACHE} and the hub cannot be "
                     f"asked ({reason}): pass a local folder with --model ./path or a zoo name "
                     "(make zoo), or download it once online (HF_HUB_OFFLINE unset)")


def _load_error(name: str, revision: str | None, source: str, e: Exception) -> UserError:
    text = " ".join(str(e).split())
    if source == "hub":
        if revision and ("revision" in text.lower() or "git identifier" in text.lower()):
            return UserError(f"model {name!r} has no revision {revision!r} on the hub (or it is "
                             "not cached): check the revision name")
        offline = _hub_offline_reason()
        if offline:  # the config was cached but not all the files the model needs
            return _offline_error(name, revision, offline, partly=True)
        return UserError(f"model {name!r} could not be loaded from the hub ({text[:200]}): check "
                         "the id, or log in (hf auth login) for a gated or private model")
    return UserError(f"model {name!r} could not be loaded from {source} folder ({text[:200]}): "
                     "check that it is a Hugging Face model folder with safetensors weights")
