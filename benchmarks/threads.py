"""Thread split of a CPU extraction (pipeline/kernels/threads.py), idle and under a competing load.

    .venv/bin/python benchmarks/threads.py            # gpt2-small shape, 8192 tokens: minutes
    .venv/bin/python benchmarks/threads.py --quick    # a tiny model, 512 tokens: checks it runs

Settings (numba's pool; torch gets every core in all of them):
  old   NUMBA_NUM_THREADS = every core (numba's default before the split)
  one   NUMBA_NUM_THREADS = 1
  new   unset: configure_threads picks numba's count from the cores other processes keep busy
Loads: idle, and busy (a busy-loop process pinned to one core, started and stopped here).

Each (setting, load) runs in a fresh process (numba reads NUMBA_NUM_THREADS at import) that
measures, on the same windows, the bare forward of the trunk (no hooks, no writes) and an
extraction with masks + accumulators, and prints both in tok/s, the ratio extraction / bare
forward, and the counts the run recorded in run.json. The busy loop is started before the
child, so the bare forward of a loaded row is loaded too. Run it on an otherwise idle machine:
the idle rows measure the split, not a neighbour.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPT2_SMALL = dict(n_layer=12, d_model=768, n_head=12, d_mlp=3072, n_positions=1024,
                  vocab_size=50257)
TINY = dict(n_layer=2, d_model=64, n_head=4, d_mlp=256, n_positions=128)


def prepare(workdir: Path, quick: bool) -> tuple[Path, Path]:
    from pipeline.models.micro import save_random_gpt2, synthetic_texts

    model_dir = workdir / ("tiny-random" if quick else "gpt2-small-random")
    corpus = workdir / "corpus.txt"
    if not (model_dir / "config.json").exists():
        save_random_gpt2(model_dir, **(TINY if quick else GPT2_SMALL))
    if not corpus.exists():
        corpus.write_text("\n\n".join(synthetic_texts(20000, words_per_text=60)))
    return model_dir, corpus


def measure(args) -> dict:
    """In the child: bare forward and extraction tok/s over the same windows."""
    import torch

    from pipeline.core.inputs import corpus_windows
    from pipeline.core.storage import Storage
    from pipeline.models.loading import load_model
    from pipeline.stages.extract import ExtractConfig, remove_run
    from pipeline.stages.extract import run as extract

    model_dir, corpus = prepare(Path(args.workdir), args.quick)
    config = ExtractConfig(model=str(model_dir), corpus=str(corpus), device="cpu",
                           num_samples=args.tokens // args.max_length, max_length=args.max_length,
                           batch_size=args.batch_size, run=f"threads-{os.getpid()}", quiet=True)
    loaded = load_model(str(model_dir), storage=Storage(model_dir.parent), device="cpu",
                        for_generation=False)
    base = loaded.adapter.base_model(loaded.model)
    windows = list(corpus_windows(config, loaded.tokenizer))
    batches = [torch.tensor(windows[i:i + args.batch_size]) for i in range(0, len(windows),
                                                                         args.batch_size)]
    with torch.inference_mode():
        base(input_ids=batches[0])  # warm-up
        start = time.perf_counter()
        for ids in batches:
            base(input_ids=ids)
        bare = sum(ids.numel() for ids in batches) / (time.perf_counter() - start)
    storage = Storage(Path(args.workdir) / "wh")
    warm = dataclasses.replace(config, num_samples=args.batch_size, run="warm")
    remove_run(storage, "warm")
    extract(warm, storage)  # numba's kernels compiled / loaded before the timed run
    remove_run(storage, config.run)
    manifest = extract(config, storage).manifest
    remove_run(storage, config.run)
    return {"bare": bare, "extract": manifest["rows"] / manifest["timings"]["seconds"],
            "threads": manifest["threads"]}


def spin(cpu: int) -> None:
    """A busy loop on one core: the competing load."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    while True:
        pass


def child(args, setting: str, cores: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    if setting != "new":
        env["NUMBA_NUM_THREADS"] = str(cores if setting == "old" else 1)
    cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--max-length",
           str(args.max_length), "--batch-size", str(args.batch_size), "--workdir", args.workdir]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and 512 tokens")
    p.add_argument("--tokens", type=int, default=None, help="tokens per measurement (8192)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nwh-bench-threads"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tokens = args.tokens or (512 if args.quick else 8192)
    args.max_length = args.max_length or (64 if args.quick else 256)
    if args.child:
        print(json.dumps(measure(args)))
        return
    from pipeline.kernels.threads import affinity_cores

    prepare(Path(args.workdir), args.quick)  # once, outside the timed children
    cpus = sorted(affinity_cores())
    print(f"cores={len(cpus)} tokens={args.tokens} batch={args.batch_size}x{args.max_length} "
          f"model={'tiny' if args.quick else 'gpt2-small shape'} (random weights) "
          f"loadavg={os.getloadavg()[0]:.2f}")
    print(f"{'load':<6} {'setting':<8} {'bare tok/s':>11} {'extract':>9} {'ratio':>6}  threads")
    results = {}
    for load in ("idle", "busy"):
        spinner = None
        if load == "busy":
            spinner = multiprocessing.Process(target=spin, args=(cpus[-1],), daemon=True)
            spinner.start()
            time.sleep(1.0)
        try:
            for setting in ("old", "one", "new"):
                r = results[load, setting] = child(args, setting, len(cpus))
                t = r["threads"]
                print(f"{load:<6} {setting:<8} {r['bare']:11.0f} {r['extract']:9.0f} "
                      f"{r['extract'] / r['bare']:6.3f}  torch={t['torch']} numba={t['numba']} "
                      f"others_load={t.get('others_load', '-')}")
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.join()
    for load in ("idle", "busy"):
        new, old = results[load, "new"]["extract"], results[load, "old"]["extract"]
        one = results[load, "one"]["extract"]
        print(f"{load}: new / old extraction {new / old:.2f}x, new / one {new / one:.2f}x")


if __name__ == "__main__":
    main()
