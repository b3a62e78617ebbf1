"""Extraction throughput and memory on a random-weight gpt2-small-shaped model.

    .venv/bin/python benchmarks/extraction.py                 # CPU, 4096 tokens per mode
    .venv/bin/python benchmarks/extraction.py --device cuda --tokens 65536

Prints, in one process and on the same token windows:
  * bare forward throughput of the trunk (no hooks, no writes) -- the baseline;
  * extraction with bit-packed masks + float64 accumulators (+ tokens table), and its ratio to
    the baseline (target >= 0.90);
  * extraction that also stores dense float16 activations of every layer (target >= 0.80);
then peak RSS of two extraction runs in fresh processes, one with 4x the tokens of the other
(target: within 10%).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.storage import Storage  # noqa: E402
from pipeline.models.micro import save_random_gpt2, synthetic_texts  # noqa: E402
from pipeline.stages.extract import ExtractConfig, remove_run  # noqa: E402
from pipeline.stages.extract import run as run_extraction  # noqa: E402

GPT2_SMALL = dict(n_layer=12, d_model=768, n_head=12, d_mlp=3072, n_positions=1024,
                  vocab_size=50257)


def prepare(workdir: Path) -> tuple[Path, Path]:
    model_dir, corpus = workdir / "gpt2-small-random", workdir / "corpus.txt"
    if not (model_dir / "config.json").exists():
        save_random_gpt2(model_dir, **GPT2_SMALL)
    if not corpus.exists():
        corpus.write_text("\n\n".join(synthetic_texts(20000, words_per_text=60)))
    return model_dir, corpus


def config(model_dir, corpus, tokens, args, **kw) -> ExtractConfig:
    return ExtractConfig(model=str(model_dir), corpus=str(corpus), device=args.device,
                         num_samples=tokens // args.max_length, max_length=args.max_length,
                         batch_size=args.batch_size, quiet=True, **kw)


def extract(cfg: ExtractConfig, storage: Storage) -> dict:
    """The manifest of a finished extraction run."""
    return run_extraction(cfg, storage).manifest


def bare_forward(model_dir: Path, corpus: Path, args) -> float:
    """Tokens/s of the trunk alone over the same windows the extraction sees."""
    from pipeline.core.inputs import corpus_windows
    from pipeline.models.loading import load_model

    loaded = load_model(str(model_dir), storage=Storage(model_dir.parent), device=args.device,
                        for_generation=False)
    base = loaded.adapter.base_model(loaded.model)
    windows = list(corpus_windows(config(model_dir, corpus, args.tokens, args), loaded.tokenizer))
    batches = [torch.tensor(windows[i:i + args.batch_size], dtype=torch.long)
               for i in range(0, len(windows), args.batch_size)]
    with torch.inference_mode():
        base(input_ids=batches[0].to(loaded.device), use_cache=False)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        n = 0
        for ids in batches:
            base(input_ids=ids.to(loaded.device), use_cache=False)  # as extraction runs it
            n += ids.numel()
        _sync(args.device)
    return n / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_extract(model_dir, corpus, args, run, **kw) -> float:
    storage = Storage(Path(args.workdir) / "wh")
    cfg = config(model_dir, corpus, args.tokens, args, run=run, **kw)
    remove_run(storage, run)  # measure afresh
    manifest = extract(cfg, storage)
    return manifest["rows"] / manifest["timings"]["seconds"]


def rss_child(args) -> None:
    """Runs one extraction and prints its peak RSS in MiB (called in a fresh process)."""
    model_dir, corpus = prepare(Path(args.workdir))
    storage = Storage(Path(args.workdir) / "wh-rss")
    remove_run(storage, f"rss-{args.tokens}")
    extract(config(model_dir, corpus, args.tokens, args, run=f"rss-{args.tokens}"), storage)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nwh-bench"))
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args)
    torch.set_num_threads(torch.get_num_threads())
    model_dir, corpus = prepare(Path(args.workdir))
    print(f"device={args.device} threads={torch.get_num_threads()} tokens={args.tokens} "
          f"batch={args.batch_size}x{args.max_length} model=gpt2-small shape (random weights)")
    base = bare_forward(model_dir, corpus, args)
    warm = argparse.Namespace(**{**vars(args), "tokens": args.max_length * args.batch_size})
    remove_run(Storage(Path(args.workdir) / "wh"), "bench-warmup")
    extract(config(model_dir, corpus, warm.tokens, warm, run="bench-warmup"),
            Storage(Path(args.workdir) / "wh"))  # warm caches, as bare_forward does
    masks = timed_extract(model_dir, corpus, args, "bench-masks")
    dense = timed_extract(model_dir, corpus, args, "bench-dense", store_acts=True)
    print(f"bare forward (trunk, no hooks)      {base:8.0f} tok/s")
    print(f"extract: masks + accumulators       {masks:8.0f} tok/s   ratio {masks / base:.3f} (target >= 0.90)")
    print(f"extract: + dense fp16, all layers   {dense:8.0f} tok/s   ratio {dense / base:.3f} (target >= 0.80)")
    peaks = {}
    for tokens in (args.tokens // 4, args.tokens):
        out = subprocess.run([sys.executable, __file__, "--rss-child", "--tokens", str(tokens),
                              "--device", args.device, "--workdir", args.workdir,
                              "--max-length", str(args.max_length), "--batch-size",
                              str(args.batch_size)], check=True, capture_output=True, text=True)
        peaks[tokens] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"peak RSS, {tokens:7d} tokens          {peaks[tokens]:8.0f} MiB")
    small, big = peaks[args.tokens // 4], peaks[args.tokens]
    print(f"peak RSS ratio 4x tokens / 1x        {big / small:8.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
