"""Sharded extraction on Ray: tokens/s of 1, 2, ... local workers, to a folder or an object store.

    .venv/bin/python benchmarks/shards.py                          # local folder, 1 and 2 workers
    .venv/bin/python benchmarks/shards.py --s3                     # a local S3 server (moto)
    .venv/bin/python benchmarks/shards.py --storage s3://bucket/x  # any fsspec URL
    .venv/bin/python benchmarks/shards.py --shards 1 2 4 --tokens 32768 --small

Each count runs `nwh extract --ray --shards N` (masks + stats) on one local Ray cluster of as
many CPUs as the largest count, on a random gpt2-small-shaped model (--small: a 4-layer, 256-wide
one), the same windows every time. Prints wall time (launch to finished run, Ray start-up
excluded: model loads in the workers and the merge included), tokens/s, the ratio to 1 shard, the
rate inside the shards' loops (summed over shards), and the bytes the run wrote per token, from which the
object-store bandwidth of many GPUs follows (printed for 64 GPUs at a given per-GPU rate).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.storage import Storage  # noqa: E402
from pipeline.models.micro import save_random_gpt2, synthetic_texts  # noqa: E402
from pipeline.stages.extract import ExtractConfig, remove_run  # noqa: E402
from pipeline.stages.extract import run as run_extraction  # noqa: E402

GPT2_SMALL = dict(n_layer=12, d_model=768, n_head=12, d_mlp=3072, n_positions=1024,
                  vocab_size=50257)
SMALL = dict(n_layer=4, d_model=256, n_head=4, d_mlp=1024, n_positions=512, vocab_size=50257)


def start_s3():
    """tests/s3_server.py's moto server on 127.0.0.1 with a bucket (its environment set)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("s3_server", ROOT / "tests" / "s3_server.py")
    spec.loader.exec_module(servers := importlib.util.module_from_spec(spec))
    return servers.s3_server(), f"s3://{servers.BUCKET}/warehouse"


def written_bytes(storage: Storage, run: str) -> int:
    total = 0
    for folder in [storage.run_dir(run)] + [storage.table_partition(t, run)
                                            for t in ("tokens", "neuron_stats", "neurons")]:
        if folder.exists():
            total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per run (default 16384)")
    p.add_argument("--length", type=int, default=256, help="tokens a window (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="windows a forward (default 4)")
    p.add_argument("--small", action="store_true", help="a 4-layer, 256-wide model")
    p.add_argument("--storage", help="storage root (default: a temporary folder)")
    p.add_argument("--s3", action="store_true", help="a local S3 server (moto) as the root")
    p.add_argument("--gpu-rate", type=float, default=467_000,
                   help="tok/s of one GPU for the 64-GPU bandwidth line (default: half an "
                        "H100's 935K bare forward of gpt2-small)")
    args = p.parse_args()

    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="nwh-shards-"))
    model_dir, corpus = work / "model", work / "corpus.txt"
    save_random_gpt2(model_dir, **(SMALL if args.small else GPT2_SMALL))
    corpus.write_text("\n\n".join(synthetic_texts(4000, words_per_text=60)))
    server = None
    if args.s3:
        server, root = start_s3()
        server.__enter__()
    else:
        root = args.storage or str(work / "storage")
    storage = Storage(root)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(args.shards), include_dashboard=False, log_to_driver=False)
    print(f"# {torch.get_num_threads()} torch threads in the driver, {os.cpu_count()} CPUs; "
          f"root {root}; {args.tokens} tokens per run")
    print("| shards | wall s | tok/s | vs 1 shard | in-shard tok/s | bytes/token |")
    print("|---|---|---|---|---|---|")
    base = None
    for n in args.shards:
        run = f"shards-{n}"
        remove_run(storage, run)
        config = ExtractConfig(model=str(model_dir), corpus=str(corpus), run=run,
                               num_samples=args.tokens // args.length, max_length=args.length,
                               batch_size=args.batch_size, ray="local", shards=n, quiet=True,
                               device="cpu")
        t0 = time.perf_counter()
        manifest = run_extraction(config, storage).manifest
        wall = time.perf_counter() - t0
        rate = manifest["rows"] / wall
        base = base or rate
        per_token = written_bytes(storage, run) / manifest["rows"]
        inside = manifest["rows"] / max(manifest["timings"]["seconds"], 1e-9) * n
        print(f"| {n} | {wall:.1f} | {rate:,.0f} | {rate / base:.2f} | {inside:,.0f} | "
              f"{per_token:,.0f} |")
    per_gpu = args.gpu_rate * per_token
    print(f"\n64 GPUs at {args.gpu_rate:,.0f} tok/s each, {per_token:,.0f} B/token (masks + "
          f"stats, compressed): {64 * per_gpu / 1e9:.1f} GB/s into the store")
    ray.shutdown()
    if server is not None:
        server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
