"""`nwh universal` against a port of the reference, and its cost at gpt2-small dimensions.

    .venv/bin/python benchmarks/universal.py agreement --storage /tmp/zoo-u   # needs `nwh zoo`
    .venv/bin/python benchmarks/universal.py scale --tokens 256               # ~15 min on 2 cores

agreement: the zoo's three seeds (zoo-s0 the reference) on 32 windows of 128 tokens (4,096
tokens), through the stage and through a port of wesg52/universal-neurons written here in
float64 (correlations_fast.py: pad (= EOS, as TransformerLens pads) and the newline token
dropped, raw streaming sums over batches of 32 windows, `rotation` = a Gaussian matrix with
unit-norm rows per layer from torch's generator; analysis/correlations.py and neuron_df.py:
max over the other model's flattened neurons, excess = mean max - mean baseline max). Prints
max |dr| of the max correlations and of the full blocks, argmax agreement, and the Jaccard of
the universal sets (excess > t) at t = 0.02..0.15 beside the port's own seed-to-seed Jaccard
(two baseline seeds). Also the stage with --exclude pad,newline (every token whose text holds a
newline, not only the token of "\\n") and with --exclude none (its old default).

scale: two random GPT-2 models with gpt2-small dimensions (12 layers, d_model 768, d_mlp 3072;
disk and RAM per token depend only on these), each cache mode run for N and 2N tokens in fresh
processes, in batches of one window (--baseline-batch 1) so that 2N tokens are more batches,
not a larger one: peak disk of the storage root (sampled every 50 ms), peak RSS, wall time; the
per-1,000-token slopes and the wall and CPU time per million tokens extrapolated from the
slope (CPU time is the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15)


# -- the port of the reference


def hooked_acts(model_dir, ids: np.ndarray) -> np.ndarray:
    """[tokens, layers x d_mlp] float64: the input of every block's mlp.c_proj, by hooks here."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = {l: [] for l in range(len(model.transformer.h))}
    handles = [b.mlp.c_proj.register_forward_pre_hook(
        lambda _m, args, l=l: seen[l].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for l, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        for s in range(0, len(ids), 8):
            model.transformer(input_ids=torch.as_tensor(ids[s:s + 8]).long())
    for h in handles:
        h.remove()
    return np.concatenate([torch.cat(seen[l]).double().numpy() for l in sorted(seen)], 1)


def port_filter(tok, ids: np.ndarray) -> np.ndarray:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    return ~np.isin(ids.reshape(-1), [pad, newline])


def port_correlation(x, y, batches) -> np.ndarray:
    s1, s1q = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    s2, s2q = np.zeros(y.shape[1]), np.zeros(y.shape[1])
    s12, n = np.zeros((x.shape[1], y.shape[1])), 0
    for sl in batches:
        a, b = x[sl], y[sl]
        s12 += a.T @ b
        s1 += a.sum(0)
        s1q += (a * a).sum(0)
        s2 += b.sum(0)
        s2q += (b * b).sum(0)
        n += len(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (s12 - np.outer(s1, s2) / n) / np.outer(np.sqrt(s1q - s1 ** 2 / n),
                                                    np.sqrt(s2q - s2 ** 2 / n))
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def port_rotation(b: np.ndarray, layers: int, seed: int) -> np.ndarray:
    import torch

    d = b.shape[1] // layers
    r = torch.randn((layers, d, d), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    r /= r.norm(dim=-1, keepdim=True)
    return np.concatenate([b[:, l * d:(l + 1) * d] @ r[l].numpy().T for l in range(layers)], 1)


def port(acts: list[np.ndarray], keep: np.ndarray, windows: int, length: int, layers: int,
         seeds: list[int]) -> dict:
    per_window = keep.reshape(windows, length).sum(1)
    ends = np.cumsum([per_window[s:s + 32].sum() for s in range(0, windows, 32)])
    batches = [slice(s, e) for s, e in zip(np.r_[0, ends[:-1]], ends)]
    a = acts[0][keep]
    out = {"corr": [], "max": [], "arg": [], "base": []}
    for b, seed in zip(acts[1:], seeds):
        b = b[keep]
        corr = port_correlation(a, b, batches)
        out["corr"].append(corr)
        out["max"].append(corr.max(1))
        out["arg"].append(corr.argmax(1))
        out["base"].append(port_correlation(a, port_rotation(b, layers, seed), batches).max(1))
    out["excess"] = np.mean(out["max"], 0) - np.mean(out["base"], 0)
    return out


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    union = (x | y).sum()
    return float((x & y).sum() / union) if union else 1.0


def agreement(args) -> dict:
    import tempfile

    from transformers import AutoTokenizer

    from pipeline.core import arrays
    from pipeline.core.inputs import TokenClasses, corpus_windows
    from pipeline.core.storage import Storage
    from pipeline.models.loading import load_model
    from pipeline.stages.universal import UniversalConfig, run

    storage = Storage(args.storage)
    names = ["zoo-s0", "zoo-s1", "zoo-s2"]
    dirs = [load_model(n, storage=storage, device="cpu").path for n in names]
    tok = AutoTokenizer.from_pretrained(dirs[0])
    base = dict(models=[str(d) for d in dirs], num_samples=32, max_length=128, device="cpu", quiet=True)
    cfg = UniversalConfig(**base)
    ids = np.array(list(corpus_windows(cfg, tok)))
    acts = [hooked_acts(d, ids) for d in dirs]
    layers = len(load_model(names[0], storage=storage, device="cpu").widths)
    ref_keep = port_filter(tok, ids)
    # the loaded tokenizer: load_model pads with EOS where the tokenizer has no pad token
    loaded_tok = load_model(names[0], storage=storage, device="cpu").tokenizer
    stage_keep = TokenClasses(loaded_tok).included(ids, cfg.excluded_classes)
    ports = {"seed 0": port(acts, ref_keep, len(ids), ids.shape[1], layers, [0, 1]),
             "seed 1": port(acts, ref_keep, len(ids), ids.shape[1], layers, [2, 3])}
    report = {"tokens": int(ids.size), "kept_reference_filter": int(ref_keep.sum()),
              "kept_stage_default_filter": int(stage_keep.sum()),
              "same_filter": bool((ref_keep == stage_keep).all()), "runs": {}}
    out_root = Path(tempfile.mkdtemp(prefix="bench-universal-"))
    runs = {"cache float32": dict(cache="float32"), "cache float16": dict(cache="float16"),
            "cache none": dict(cache="none", block_memory=0.05),
            "exclude pad,newline (every token holding a newline)":
                dict(cache="float32", exclude="pad,newline"),
            "exclude none (the old default)": dict(cache="float32", exclude="none")}
    for index, (label, kw) in enumerate(runs.items()):
        t0 = time.perf_counter()
        res = run(UniversalConfig(**base, name="u", **kw), Storage(out_root / f"r{index}"))
        wall = time.perf_counter() - t0
        report["runs"][label] = {"wall_s": wall, "tokens": res.info["tokens"]}
        group = arrays.open_group(Storage(out_root / f"r{index}").arrays("u"), mode="r")
        for against in ("seed 0",):
            p = ports[against]
            rows = {}
            for i, m in enumerate(names[1:]):
                s = res.summary.filter(res.summary["model_b"] == str(dirs[i + 1])).sort(
                    "neuron_id")
                got_arg = s["argmax_layer"].to_numpy() * (acts[0].shape[1] // layers) + \
                    s["argmax_neuron"].to_numpy()
                d = acts[0].shape[1] // layers
                blocks = max(float(np.abs(group[f"corr/m{i + 1}/L{la}_L{lb}"][:] -
                                          p["corr"][i][la * d:(la + 1) * d, lb * d:(lb + 1) * d]
                                          ).max()) for la in range(layers) for lb in range(layers))
                rows[m] = {"max_abs_dr_max_corr": float(np.abs(s["max_corr"].to_numpy()
                                                               - p["max"][i]).max()),
                           "max_abs_dr_blocks_float32": blocks,
                           "argmax_agreement": float((got_arg == p["arg"][i]).mean())}
            excess = res.neurons.sort("neuron_id")["excess"].to_numpy()
            rows["jaccard"] = {f"{t:.2f}": jaccard(excess > t, p["excess"] > t)
                               for t in THRESHOLDS}
            rows["universal_counts"] = {f"{t:.2f}": [int((excess > t).sum()),
                                                     int((p["excess"] > t).sum())]
                                        for t in THRESHOLDS}
            report["runs"][label][f"vs port ({against})"] = rows
    report["port seed-to-seed jaccard"] = {
        f"{t:.2f}": jaccard(ports["seed 0"]["excess"] > t, ports["seed 1"]["excess"] > t)
        for t in THRESHOLDS}
    report["port universal counts seed 0 / seed 1"] = {
        f"{t:.2f}": [int((ports["seed 0"]["excess"] > t).sum()),
                     int((ports["seed 1"]["excess"] > t).sum())] for t in THRESHOLDS}
    return report


# -- scale: gpt2-small dimensions


def _disk(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass  # renamed or removed while walking
    return total


def scale_child(args) -> None:
    from pipeline.core.storage import Storage
    from pipeline.stages.universal import UniversalConfig, run

    root = Path(args.root)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _disk(root / "runs"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    corpus = root / "corpus.txt"
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = use.ru_utime + use.ru_stime
    t0 = time.perf_counter()
    out = run(UniversalConfig(models=[str(root / "m0"), str(root / "m1")], corpus=str(corpus),
                              num_samples=args.tokens // 128, max_length=128, device="cpu",
                              cache=args.cache, block_memory=args.block_memory, quiet=True,
                              baseline_batch=args.baseline_batch,
                              name=f"s-{args.cache}-{args.tokens}"), Storage(root))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _disk(root / "runs"))
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": use.ru_utime + use.ru_stime - cpu0,
                      "load_avg": os.getloadavg()[0], "peak_disk": peak[0], "tokens": out.info["tokens"],
                      "passes": out.info["passes"], "cache_bytes": out.info["cache_bytes"],
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def scale(args) -> dict:
    import shutil
    import tempfile

    from pipeline.models.micro import save_random_gpt2

    work = Path(tempfile.mkdtemp(prefix="bench-universal-scale-"))
    for i in range(2):
        save_random_gpt2(work / f"m{i}", seed=i, n_layer=12, d_model=768, n_head=12, d_mlp=3072,
                         n_positions=1024)
    rng = np.random.default_rng(0)
    words = [w for w in (Path(np.__file__).parent / "__init__.py").read_text().split() if
             w.isalpha()]
    (work / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60))
                                                 for _ in range(8 * args.tokens // 50 + 50)))
    report = {}
    for cache in args.modes:
        rows = {}
        for tokens in (args.tokens, 2 * args.tokens):
            shutil.rmtree(work / "runs", ignore_errors=True)
            shutil.rmtree(work / "tables", ignore_errors=True)
            done = subprocess.run([sys.executable, __file__, "scale-child", "--root", str(work),
                                   "--cache", cache, "--tokens", str(tokens), "--block-memory",
                                   str(args.block_memory), "--baseline-batch",
                                   str(args.baseline_batch)], check=True, capture_output=True,
                                  text=True)
            rows[tokens] = json.loads(done.stdout.strip().splitlines()[-1])
            print(cache, tokens, rows[tokens], flush=True)
        small, big = rows[args.tokens], rows[2 * args.tokens]
        dt = big["tokens"] - small["tokens"]
        report[cache] = {"runs": rows,
                         "disk_per_1000_tokens_MB": (big["peak_disk"] - small["peak_disk"])
                         / dt * 1000 / 1e6,
                         "ram_per_1000_tokens_MB": (big["peak_rss"] - small["peak_rss"])
                         / dt * 1000 / 1e6,
                         "cache_per_1000_tokens_MB": (big["cache_bytes"] - small["cache_bytes"])
                         / dt * 1000 / 1e6,
                         "fixed_disk_GB": small["peak_disk"] / 1e9,
                         "peak_rss_GB": big["peak_rss"] / 1e9,
                         "hours_per_million_tokens": (big["wall_s"] - small["wall_s"]) / dt
                         * 1e6 / 3600,
                         "cpu_hours_per_million_tokens": (big["cpu_s"] - small["cpu_s"]) / dt
                         * 1e6 / 3600}
    shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["agreement", "scale", "scale-child"])
    p.add_argument("--storage", default="storage", help="agreement: root holding the zoo")
    p.add_argument("--tokens", type=int, default=256, help="scale: N (runs N and 2N)")
    p.add_argument("--block-memory", type=float, default=4.0)
    p.add_argument("--baseline-batch", type=int, default=1,
                   help="scale: windows per batch (1: N and 2N tokens span 2 and 4 batches, so "
                   "the RAM slope is over the token count, not the batch size)")
    p.add_argument("--modes", nargs="+", default=["float16", "float32", "none"],
                   help="scale: the cache modes to run")
    p.add_argument("--cache", default="float16", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args()
    if args.mode == "scale-child":
        scale_child(args)
        return
    report = agreement(args) if args.mode == "agreement" else scale(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
