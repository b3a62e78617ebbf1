"""Extraction against its peers: the same model, token windows and layers through each tool.

    .venv/bin/python benchmarks/peers.py                       # gpt2-small shape, 8192 tokens
    .venv/bin/python benchmarks/peers.py --small --tokens 512 --repeats 1   # checks every tool runs

Tools (each run in its own fresh process, --repeats times, medians reported):
  bare        the transformer body's forward alone, no hooks, nothing written (the baseline)
  hooks       forward pre-hooks on every block's mlp.c_proj, np.save of the input as float16
  nnsight     NNsight(body).trace per batch, .save() of every c_proj input, np.save float16
  tlens       TransformerLens TransformerBridge.run_with_cache, names filter mlp.hook_post
              (the c_proj input), np.save float16
  nwh         `python -m pipeline extract` on a corpus file that gives the same windows:
              masks + stats (default), and with --store-acts (dense float16)

The model is a random GPT-2 of gpt2-small shape (12 x 768, 3072 neurons a layer, fp32, CPU),
fed batches of --batch-size x --length tokens. No tool runs the unembedding: the peers get the
body (nnsight wraps GPT2Model; TransformerLens stops at ln_final by raising its
StopAtLayerException there, as its own stop_at_layer does). The body runs with use_cache=False
in bare, hooks, nnsight and nwh: a key/value cache is copies nobody reads (in a fresh process
it costs the forward ~15% on this CPU), so the baseline is the trunk's fastest plain forward. TransformerLens forces eager
attention (its hooks need the scores); the others use transformers' default (sdpa). Every loop
starts cold (no warm-up batch), as nwh's does.

Per tool: loop tok/s (the forward loop timed inside the child, writes included), its ratio to
bare, whole-process wall time (start to exit: imports, loading, loop, writes), peak RSS of the
child (os.wait4), bytes written; then nwh's ratios to each peer and a markdown table. A probe
(mean |a| of the last layer over the first batch, as saved) must agree with the plain hooks.

nnsight and TransformerLens are installed on first use with `pip install --target DIR/<peer>
--no-deps` (pinned versions, plus only the small modules the venv lacks, one at a time), so
they never replace the venv's torch or transformers; `--install DIR` chooses the folder
(default ~/.cache/nwh-peers), `--no-install` skips a peer that is not there yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPT2_SMALL = dict(n_layer=12, d_model=768, n_head=12, d_mlp=3072, n_positions=1024,
                  vocab_size=50257)
SMALL = dict(n_layer=4, d_model=128, n_head=4, d_mlp=512, n_positions=1024)

TOOLS = ("bare", "hooks", "nnsight", "tlens", "nwh", "nwh-dense")
LABELS = {"bare": "bare trunk (no hooks)", "hooks": "plain hooks + np.save fp16",
          "nnsight": "nnsight trace + np.save fp16",
          "tlens": "TransformerLens run_with_cache + np.save fp16",
          "nwh": "nwh extract (masks + stats)", "nwh-dense": "nwh extract --store-acts (fp16)"}

# The peers, pinned; `packages` are installed together, then any module the import still
# misses is added alone (MODULE_PACKAGES maps import names to package names).
PEERS = {
    "nnsight": dict(module="nnsight", dist="nnsight", packages=["nnsight==0.8.1", "greenlet"]),
    "tlens": dict(module="transformer_lens", dist="transformer-lens",
                  packages=["transformer-lens==4.3.0", "einops", "jaxtyping"]),
}
MODULE_PACKAGES = {"fancy_einsum": "fancy-einsum", "google": "protobuf", "yaml": "pyyaml",
                   "websocket": "websocket-client", "transformers_stream_generator":
                   "transformers-stream-generator", "wadler_lindig": "wadler-lindig"}
# a peer that needs another build of these would replace the venv's own: give up instead
NEVER_INSTALL = {"torch", "transformers", "tokenizers", "safetensors", "numpy", "huggingface_hub"}


# -- the child: one tool, one process


def _body(model_dir: Path):
    import torch
    from transformers import GPT2Model

    return GPT2Model.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save(out: Path, batch: int, layer: int, x) -> None:
    import numpy as np
    import torch

    np.save(out / f"b{batch:05d}-L{layer:02d}.npy", x.to(torch.float16).numpy())


def setup_bare(model_dir: Path, out: Path):
    body = _body(model_dir)
    return lambda b, ids: body(input_ids=ids, use_cache=False)


def setup_hooks(model_dir: Path, out: Path):
    body = _body(model_dir)
    current = [0]

    def hook(layer):
        def pre(module, inputs):
            _save(out, current[0], layer, inputs[0])
        return pre

    for layer, block in enumerate(body.h):
        block.mlp.c_proj.register_forward_pre_hook(hook(layer))

    def step(b, ids):
        current[0] = b
        body(input_ids=ids, use_cache=False)
    return step


def setup_nnsight(model_dir: Path, out: Path):
    from nnsight import NNsight

    body = _body(model_dir)
    model, n_layer = NNsight(body), len(body.h)

    def step(b, ids):
        saved = []
        with model.trace(ids, use_cache=False):
            for layer in range(n_layer):
                saved.append(model.h[layer].mlp.c_proj.input.save())
        for layer, x in enumerate(saved):
            _save(out, b, layer, x)
    return step


def setup_tlens(model_dir: Path, out: Path):
    import torch
    from transformer_lens import TransformerBridge
    from transformer_lens.model_bridge.exceptions import StopAtLayerException
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    bridge = TransformerBridge.boot_transformers(
        str(model_dir), hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(model_dir),
        device="cpu")
    n_layer = hf.config.n_layer

    def stop(tensor, hook):  # the body's output: skip ln_final and the unembedding
        raise StopAtLayerException(tensor)

    def step(b, ids):
        with bridge.hooks(fwd_hooks=[("ln_final.hook_in", stop)]):
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("mlp.hook_post"))
        for layer in range(n_layer):
            _save(out, b, layer, cache[f"blocks.{layer}.mlp.hook_post"])
    return step


def child(args) -> None:
    """Runs one in-script tool over the saved windows; writes its figures to --result."""
    import numpy as np
    import torch

    model_dir, out = Path(args.model_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.from_numpy(np.load(args.ids))
    batches = list(torch.split(ids, args.batch_size))
    step = globals()[f"setup_{args.child}"](model_dir, out)
    with torch.inference_mode():
        start = time.perf_counter()
        for b, batch in enumerate(batches):
            step(b, batch)
        loop = time.perf_counter() - start
    n_layer = json.loads((model_dir / "config.json").read_text())["n_layer"]
    first = out / f"b00000-L{n_layer - 1:02d}.npy"
    probe = float(np.abs(np.load(first).astype(np.float64)).mean()) if first.exists() else None
    Path(args.result).write_text(json.dumps({
        "tokens": int(ids.numel()), "loop_s": loop, "probe": probe,
        "threads": {"torch": torch.get_num_threads()}}))


# -- the parent: setup, installs, measurement


def cpu_info() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "avx512f": None, "avx512_vpopcntdq": None}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return {"model": model.group(1).strip() if model else "unknown",
            "avx512f": "avx512f" in have, "avx512_vpopcntdq": "avx512_vpopcntdq" in have,
            "cores": os.cpu_count()}


def prepare(workdir: Path, args) -> tuple[Path, Path, Path]:
    """The model folder, a corpus file, and the windows nwh will cut from it (ids .npy)."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.core.inputs import corpus_windows
    from pipeline.models.micro import save_random_gpt2, synthetic_texts
    from pipeline.stages.extract import ExtractConfig

    shape = SMALL if args.small else GPT2_SMALL
    if args.length > shape["n_positions"]:
        raise SystemExit(f"--length {args.length} exceeds the model's {shape['n_positions']} "
                         "positions: lower --length")
    model_dir = workdir / ("small-random" if args.small else "gpt2-small-random")
    if not (model_dir / "config.json").exists():
        save_random_gpt2(model_dir, **shape)
    corpus = workdir / f"corpus-{args.tokens}.txt"
    if not corpus.exists():  # ~60 tokens a text; a margin so every window fills
        corpus.write_text("\n\n".join(synthetic_texts(args.tokens // 30 + 100,
                                                      words_per_text=60)))
    config = ExtractConfig(model=str(model_dir), corpus=str(corpus), num_samples=args.num_seq,
                           max_length=args.length, batch_size=args.batch_size, quiet=True)
    windows = list(corpus_windows(config, AutoTokenizer.from_pretrained(model_dir)))
    if len(windows) != args.num_seq:
        raise SystemExit(f"the corpus gave {len(windows)} windows, {args.num_seq} needed")
    ids_path = workdir / f"ids-{model_dir.name}-{args.num_seq}x{args.length}.npy"
    np.save(ids_path, np.asarray(windows, dtype=np.int64))
    return model_dir, corpus, ids_path


def _pip(target: Path, packages: list[str], log: list[str]) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
           "--target", str(target), "--no-deps", *packages]
    log.append(" ".join(["pip", *cmd[3:]]))
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def _probe_import(target: Path, module: str, dist: str) -> tuple[str | None, str]:
    """(version, '') when `module` imports from `target`, else (None, the last error line)."""
    code = (f"import {module}, importlib.metadata as m; print(m.version({dist!r}))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout.strip().splitlines()[-1], ""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    return None, lines[-1] if lines else f"exit {r.returncode}"


def ensure_peer(name: str, install_dir: Path, allow_install: bool) -> dict:
    """The peer's folder and version, installing it (no deps) when it is missing."""
    spec, target, log = PEERS[name], install_dir / name, []
    version, error = _probe_import(target, spec["module"], spec["dist"])
    if version is None and allow_install:
        target.mkdir(parents=True, exist_ok=True)
        if not _pip(target, spec["packages"], log):
            return {"ok": False, "reason": f"pip could not install {spec['packages']}",
                    "commands": log}
        for _ in range(12):  # add what the import still misses, one module at a time
            version, error = _probe_import(target, spec["module"], spec["dist"])
            missing = re.search(r"No module named '([^'.]+)", error)
            if version is not None or missing is None:
                break
            module = missing.group(1)
            if module in NEVER_INSTALL:
                error = f"needs another {module} than the venv's ({error})"
                break
            if not _pip(target, [MODULE_PACKAGES.get(module, module)], log):
                error = f"pip could not install {MODULE_PACKAGES.get(module, module)}"
                break
    if version is None:
        reason = error if allow_install else f"not installed in {target} (--no-install)"
        return {"ok": False, "reason": reason, "commands": log}
    return {"ok": True, "version": version, "path": str(target), "commands": log}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# Peak RSS of a child comes from os.wait4, but Linux carries the parent's high-water mark over
# fork + exec into the child's ru_maxrss: a parent that has imported torch would set a floor of
# ~400 MiB under every figure. So children are started by this small launcher, itself started
# before the parent imports anything heavy.
LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "w") as out, open(job["err"], "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], cwd=job["cwd"], env=job["env"], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    print(json.dumps([proc.returncode, wall, usage.ru_maxrss / 1024]), flush=True)
"""


class Launcher:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, cmd: list[str], env: dict, log_stem: Path) -> tuple[int, float, float]:
        """(exit status, wall seconds, peak RSS MiB) of one child process."""
        job = {"cmd": cmd, "env": env, "cwd": str(ROOT), "out": f"{log_stem}.out",
               "err": f"{log_stem}.err"}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc, wall, rss = json.loads(self.proc.stdout.readline())
        return rc, wall, rss

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _tail(path: str) -> str:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def measure(tool: str, rep: int, setup: dict, args, peers: dict) -> dict:
    workdir, model_dir, ids_path = setup["workdir"], setup["model_dir"], setup["ids"]
    logs, out = workdir / "logs", workdir / f"out-{tool}"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(
        ([peers[tool]["path"]] if tool in PEERS else []) + [str(ROOT)])
    stem = logs / f"{tool}-{rep}"
    if tool.startswith("nwh"):
        cmd = [sys.executable, "-m", "pipeline", "extract", "--model", str(model_dir),
               "--corpus", str(setup["corpus"]), "--num-samples", str(args.num_seq),
               "--max-length", str(args.length), "--batch-size", str(args.batch_size),
               "--storage", str(out), "--run", "peers", "--device", "cpu",
               "--dtype", "float32", "--quiet"] + (["--store-acts"] if tool == "nwh-dense" else [])
    else:
        result_file = workdir / f"result-{tool}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", tool, "--model-dir", str(model_dir),
               "--ids", str(ids_path), "--out", str(out), "--result", str(result_file),
               "--batch-size", str(args.batch_size)]
    rc, wall, rss = setup["launcher"].run(cmd, env, stem)
    if rc != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {"ok": False, "reason": f"exit {rc}: {_tail(f'{stem}.err')} (log {stem}.err)"}
    written = dir_bytes(out)
    got = nwh_figures(out, setup, tool) if tool.startswith("nwh") else json.loads(
        result_file.read_text())
    shutil.rmtree(out, ignore_errors=True)  # a dense run is ~0.6 GB at the default size
    if "reason" in got:
        return {"ok": False, "reason": got["reason"]}
    return {"ok": True, "tok_s": got["tokens"] / got["loop_s"], "wall_s": wall, "rss_mib": rss,
            "written": written, "tokens": got["tokens"], "probe": got["probe"],
            "threads": got["threads"]}


def nwh_figures(storage_root: Path, setup: dict, tool: str) -> dict:
    """Loop time and rows from run.json; the tokens table must hold exactly our windows."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.core import arrays
    from pipeline.core.storage import Storage

    storage = Storage(storage_root)
    manifest = json.loads(storage.run_manifest("peers").read_text())
    ids = np.load(setup["ids"])
    table = pq.read_table(storage.table_partition("tokens", "peers"),
                          columns=["row", "token_id"]).to_pandas().sort_values("row")
    if manifest["rows"] != ids.size or not np.array_equal(table["token_id"].to_numpy(),
                                                          ids.reshape(-1)):
        return {"reason": f"nwh saw other tokens ({manifest['rows']} rows, {ids.size} expected)"}
    probe = None
    if tool == "nwh-dense":
        last = json.loads((setup["model_dir"] / "config.json").read_text())["n_layer"] - 1
        first = ids.shape[1] * min(setup["batch_size"], ids.shape[0])
        acts = arrays.open_group(storage.arrays("peers"), mode="r")[f"acts/L{last}"][:first]
        probe = float(np.abs(np.asarray(acts, dtype=np.float64)).mean())
    return {"tokens": manifest["rows"], "loop_s": manifest["timings"]["seconds"],
            "probe": probe, "threads": manifest.get("threads")}


def prime(setup: dict, peers: dict) -> None:
    """One untimed process that imports every tool, reads the model and loads nwh's kernel, so
    the first timed child does not pay alone for a cold page cache or a numba cache to rebuild."""
    modules = ["torch", "transformers", "pipeline.stages.extract", "pipeline.kernels.bitkernels"]
    modules += [PEERS[name]["module"] for name, peer in peers.items() if peer["ok"]]
    code = (f"import {', '.join(modules)}; "
            f"transformers.GPT2Model.from_pretrained({str(setup['model_dir'])!r}); "
            "pipeline.kernels.bitkernels.warm()")  # compiles the kernels if their cache is stale
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [peer["path"] for peer in peers.values() if peer["ok"]] + [str(ROOT)])}
    setup["launcher"].run([sys.executable, "-c", code], env, setup["workdir"] / "logs" / "prime")


def summarize(runs: list[dict]) -> dict:
    good = [r for r in runs if r["ok"]]
    if len(good) < len(runs):
        return next(r for r in runs if not r["ok"])
    keys = ("tok_s", "wall_s", "rss_mib", "written")
    out = {k: statistics.median(r[k] for r in good) for k in keys}
    # the least disturbed run of each tool, for a machine other processes share
    out.update(best_tok_s=max(r["tok_s"] for r in good), best_wall_s=min(r["wall_s"] for r in good))
    return {"ok": True, **out, "runs": good, "tokens": good[0]["tokens"],
            "probe": good[0]["probe"], "threads": good[0]["threads"]}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report(results: dict, peers: dict, args, meta: dict) -> int:
    bare = results.get("bare", {})
    base = bare.get("tok_s") if bare.get("ok") else None
    ref = results.get("hooks", {}).get("probe")
    failed = 0
    print()
    for tool in args.tools:
        r = results[tool]
        if not r["ok"]:
            failed += tool not in PEERS or peers.get(tool, {}).get("ok", False)
            print(f"{LABELS[tool]:<46} {r['reason']}")
            continue
        vs = f"{r['tok_s'] / base:6.3f} x bare" if base else ""
        check = ""
        if r["probe"] is not None and ref is not None and tool != "hooks":
            same = abs(r["probe"] - ref) <= 1e-3 * abs(ref)
            check = "  probe ok" if same else f"  PROBE DIFFERS ({r['probe']:.6g} vs {ref:.6g})"
            failed += not same
        print(f"{LABELS[tool]:<46} {r['tok_s']:9.0f} tok/s {vs}  whole {r['wall_s']:6.1f} s  "
              f"RSS {r['rss_mib']:6.0f} MiB  wrote {human_bytes(r['written'])}{check}")
    pairs = [(mine, other) for mine in ("nwh", "nwh-dense") for other in ("hooks", "nnsight", "tlens")
             if results.get(mine, {}).get("ok") and results.get(other, {}).get("ok")]
    if pairs:
        print("\nratios nwh / peer (loop tok/s; whole process: peer wall time / nwh wall time):")
    for mine, other in pairs:
        m, o = results[mine], results[other]
        print(f"  {mine:<9} vs {other:<8} {m['tok_s'] / o['tok_s']:6.2f}x loop   "
              f"{o['wall_s'] / m['wall_s']:6.2f}x whole process")
    print("\n| tool | loop tok/s | vs bare | whole process | peak RSS | written |")
    print("|---|---:|---:|---:|---:|---:|")
    for tool in args.tools:
        r = results[tool]
        name = LABELS[tool] + (f" {peers[tool]['version']}" if tool in PEERS and
                               peers[tool].get("ok") else "")
        if not r["ok"]:
            print(f"| {name} | {r['reason'].replace('|', '/')} | | | | |")
            continue
        vs = f"{r['tok_s'] / base:.3f}" if base else "-"
        print(f"| {name} | {r['tok_s']:.0f} | {vs} | {r['wall_s']:.1f} s | "
              f"{r['rss_mib']:.0f} MiB | {human_bytes(r['written'])} |")
    if args.repeats > 1:
        best_base = bare.get("best_tok_s") if bare.get("ok") else None
        print(f"\nbest of {args.repeats} (the fastest loop and the shortest process of each tool; "
              "a shared machine disturbs some runs):\n")
        print("| tool | loop tok/s | vs bare | whole process |")
        print("|---|---:|---:|---:|")
        for tool in args.tools:
            r = results[tool]
            if r["ok"]:
                vs = f"{r['best_tok_s'] / best_base:.3f}" if best_base else "-"
                print(f"| {LABELS[tool]} | {r['best_tok_s']:.0f} | {vs} | {r['best_wall_s']:.1f} s |")
    print(f"\npeak RSS of an empty python child: {meta['rss_floor_mib']:.0f} MiB; load average "
          f"before {meta['load_before']}, after {meta['load_after']}")
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per tool (default 8192)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences a forward (default 4)")
    p.add_argument("--length", type=int, default=256, help="tokens a sequence (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool; medians (default 3)")
    p.add_argument("--small", action="store_true",
                   help="a small random GPT-2 (4 x 128, 512 neurons) instead of gpt2-small shape")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated subset of {','.join(TOOLS)} (default all)")
    p.add_argument("--install", default=str(Path.home() / ".cache" / "nwh-peers"),
                   help="folder of the peers' --target installs (created when missing)")
    p.add_argument("--no-install", action="store_true", help="skip a peer not installed yet")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nwh-bench-peers"))
    p.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    p.add_argument("--child", choices=("bare", "hooks", "nnsight", "tlens"), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--ids", "--out", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown or args.tokens < args.length or min(args.repeats, args.batch_size) < 1:
        p.error(f"unknown tool(s) {unknown}" if unknown else
                "--tokens must be at least --length; --repeats and --batch-size at least 1")
    if "bare" not in args.tools:
        args.tools.insert(0, "bare")  # the baseline of every ratio
    args.num_seq = args.tokens // args.length
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    cpu = cpu_info()
    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    launcher = Launcher()  # before torch is imported here (see LAUNCHER)
    try:
        run_all(args, workdir, launcher, load_before, cpu)
    finally:
        launcher.close()


def run_all(args, workdir: Path, launcher: Launcher, load_before: tuple, cpu: dict) -> None:
    floor = launcher.run([sys.executable, "-c", "pass"], dict(os.environ), workdir / "logs" / "floor")[2]
    model_dir, corpus, ids = prepare(workdir, args)
    setup = {"workdir": workdir, "model_dir": model_dir, "corpus": corpus, "ids": ids,
             "batch_size": args.batch_size, "launcher": launcher}
    shape = SMALL if args.small else GPT2_SMALL
    print(f"cpu: {cpu['model']}, {cpu['cores']} cores, avx512f={'yes' if cpu['avx512f'] else 'no'}"
          f", avx512_vpopcntdq={'yes' if cpu['avx512_vpopcntdq'] else 'no'}")
    print(f"model: random GPT-2 {shape['n_layer']} layers x {shape['d_model']}, "
          f"{shape['d_mlp']} neurons a layer, fp32, cpu; every c_proj input")
    print(f"tokens: {args.num_seq * args.length} ({args.num_seq} x {args.length}), batch "
          f"{args.batch_size} x {args.length}; repeats {args.repeats} (medians); "
          f"load average {load_before}")
    peers = {}
    for name in PEERS:
        if name in args.tools:
            peers[name] = ensure_peer(name, Path(args.install), not args.no_install)
            state = (f"{peers[name]['version']} from {peers[name]['path']}" if peers[name]["ok"]
                     else f"unavailable: {peers[name]['reason']}")
            print(f"{name}: {state}")
            for command in peers[name]["commands"]:
                print(f"  ran: {command}")
    prime(setup, peers)
    runs: dict[str, list[dict]] = {t: [] for t in args.tools}
    for rep in range(args.repeats):  # interleaved, so a drifting machine load hits every tool
        for tool in args.tools:
            if tool in peers and not peers[tool]["ok"]:
                runs[tool] = [{"ok": False, "reason": f"not run: {peers[tool]['reason']}"}]
                continue
            r = measure(tool, rep, setup, args, peers)
            runs[tool].append(r)
            state = (f"{r['tok_s']:.0f} tok/s, {r['wall_s']:.1f} s" if r["ok"] else r["reason"])
            print(f"  run {rep + 1}/{args.repeats} {tool:<9} {state}", flush=True)
    results = {tool: summarize(runs[tool]) for tool in args.tools}
    meta = {"cpu": cpu, "load_before": load_before,
            "load_after": tuple(round(x, 2) for x in os.getloadavg()),
            "tokens": args.num_seq * args.length, "batch_size": args.batch_size,
            "length": args.length, "repeats": args.repeats, "model": shape,
            "peers": peers, "rss_floor_mib": floor}
    failed = report(results, peers, args, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=1,
                                              default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
