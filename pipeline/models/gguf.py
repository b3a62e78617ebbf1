"""GGUF files (llama.cpp's format) loaded as plain dense Hugging Face models, or saved as folders.

    import torch
    from pipeline.models.gguf import load_gguf, save_gguf_as_folder

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", device=torch.device("cpu"),
                                 dtype=torch.float32)
    save_gguf_as_folder("SmolLM2-135M-Instruct.Q4_1.gguf", "storage/models/smollm2-135m")

transformers reads the file through the `gguf` package (and needs `accelerate` for it) and
dequantizes every weight (Q4_1 blocks -> d * q + m in float32). What it returns depends on how
it is asked and on its version: transformers 5.24 without GgufConfig(dequantize=True) keeps the
model flagged as quantized (config.quantization_config, model.hf_quantizer) and save_pretrained
refuses it ("quantized with gguf and is not serializable"); newer code paths may keep blocks
packed in GgufLinear modules with no dense weight. So the dequantized weights are always copied
into a model built from the same config without the quantization entry (from_config +
load_state_dict, strict): what these functions return and save is an ordinary dense model, the
same as one loaded from a safetensors folder.

Needs the optional extra: pip install -e '.[gguf]'.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.core.errors import UserError
from pipeline.core.storage import atomic_path

log = logging.getLogger(__name__)

EXTRA = "pip install -e '.[gguf]'"


def require_gguf() -> None:
    """The packages transformers' GGUF loading needs, or a one-line UserError naming the extra."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    for package, minimum in (("gguf", GGUF_MIN_VERSION), ("accelerate", None)):
        try:
            __import__(package)
            installed = version(package)
        except (ImportError, PackageNotFoundError):
            raise UserError(f"loading a GGUF file needs the {package!r} package, which is not "
                            f"installed: {EXTRA}") from None
        if minimum and Version(installed) < Version(minimum):
            raise UserError(f"loading a GGUF file needs {package}>={minimum}, installed is "
                            f"{installed}: {EXTRA}")


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file (metadata only; the tensors stay on disk)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).get_field("general.architecture")
    except (ValueError, OSError) as e:
        raise UserError(f"GGUF file {str(path)!r} cannot be read ({' '.join(str(e).split())[:120]}):"
                        " check that it is a GGUF file") from None
    if field is None:
        raise UserError(f"GGUF file {str(path)!r} has no general.architecture: it is not a "
                        "model file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_architectures() -> list[str]:
    """GGUF architectures this transformers version converts (its legacy and newer tables)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # older transformers: the legacy table only
        GGUF_ARCHS = {}
    return sorted(names | set(GGUF_ARCHS))


def _check_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {str(path)!r} does not exist: check the path")
    return path


@contextmanager
def _quiet_dequantization() -> Iterator[None]:
    """transformers' legacy GGUF reader draws its own tqdm bar, outside hf_logging's switch;
    stages show their own progress, so it is replaced by a silent one while the file is read."""
    from functools import partial

    try:
        import transformers.modeling_gguf_pytorch_utils as legacy
    except ImportError:
        yield
        return
    original = getattr(legacy, "tqdm", None)
    if original is not None:
        legacy.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            legacy.tqdm = original


def _read(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """transformers' GGUF loading, every weight dequantized (the model is still flagged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with _quiet_dequantization():
            # dequantize=True: newer transformers can keep blocks packed in GgufLinear modules
            # (no dense .weight for the adapters); the dense model is what the warehouse hooks
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype,
                quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError) as e:
        # the file is parsed again only here: reading its metadata costs seconds
        arch = gguf_architecture(path)
        if arch not in supported_architectures() or "not supported" in str(e):
            raise UserError(f"GGUF file {str(path)!r} holds a {arch!r} model, which transformers "
                            f"cannot convert: supported are {', '.join(supported_architectures())}"
                            ) from None
        text = " ".join(str(e).split())
        raise UserError(f"GGUF file {str(path)!r} could not be loaded ({text[:200]})") from None
    return model, tokenizer


def _plain_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same weights in a model built from the config without its quantization entry."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)  # a mismatch is a conversion bug
    return plain


def load_gguf(path: str | Path, *, device: torch.device | str,
              dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a GGUF file: a plain dense causal LM in eval mode on `device`.

    Call it with the resolved device and dtype, as models.loading.load_model has them:

        model, tokenizer = load_gguf(Path(name), device=dev, dtype=torch_dtype)

    (`dev` a torch.device such as torch.device("cpu"), `torch_dtype` such as torch.float32).
    Bad input gives a one-line UserError: a missing file, missing packages (naming the extra
    `pip install -e '.[gguf]'`), a file that is not GGUF, an architecture transformers cannot
    convert. The tokenizer is the one the file embeds; its pad token is set to EOS when absent.
    """
    path = _check_file(path)
    require_gguf()
    quantized, tokenizer = _read(path, dtype)
    model = _plain_copy(quantized, dtype)
    del quantized
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    log.info("loaded GGUF %s (%s, dequantized to %s)", path.name, model.config.model_type, dtype)
    return model.to(torch.device(device)).eval(), tokenizer


def save_gguf_as_folder(path: str | Path, out_dir: str | Path, *,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Save a GGUF file as a Hugging Face folder (config, safetensors weights, tokenizer).

    float32 keeps the dequantized weights exactly (d * q + m is not representable in 16 bits
    in general). The folder is written under a temporary name and renamed when complete
    (atomic_path): a reader sees no folder, the old one or the whole new one.
    """
    out_dir = Path(out_dir)
    model, tokenizer = load_gguf(path, device=torch.device("cpu"), dtype=dtype)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
