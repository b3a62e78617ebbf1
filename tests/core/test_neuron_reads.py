"""One-neuron reads of neuron-blocked arrays, against dense NumPy matrices and the shard index
parsed here from the file bytes (the Zarr sharding spec: little-endian uint64 (offset, length)
pairs per inner chunk, then a crc32c, at the end of each shard); runs written before neuron
blocks still read; `nwh export` streams in bounded row blocks and fails without losing files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from reference import mlp_inputs
from zarr.abc.store import RangeByteRequest
from zarr.storage import LocalStore, WrapperStore

import pipeline.stages.export as export
from pipeline.cli import main
from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, write_json
from pipeline.core.warehouse import connect
from pipeline.models.micro import save_random_gpt2
from pipeline.stages.frequencies import TopTokensConfig, run_top_tokens

ROWS, CHUNK, WIDTH = 3 * 64 + 17, 64, 600  # 4 shards, the last one partial; 3 acts blocks
PROMPTS = Path(__file__).resolve().parents[2] / "examples" / "prompts.csv"

READS: list[tuple[str, object]] = []  # (key, byte range) of every store read


class RecordingStore(WrapperStore):
    async def get(self, key, prototype, byte_range=None):
        READS.append((key, byte_range))
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        READS.extend(key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


@pytest.fixture()
def recorded(monkeypatch):
    """arrays.open_group through a store that records every read."""
    def open_group(path, mode="a"):
        store = RecordingStore(LocalStore(str(path), read_only=mode == "r"))
        return zarr.open_group(store=store, mode=mode)

    monkeypatch.setattr(arrays, "open_group", open_group)
    READS.clear()
    return READS


def shard_index(path: Path, inner_chunks: int) -> list[tuple[int, int]]:
    """(offset, length) of each inner chunk of a shard file, read from its trailing index."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * inner_chunks + 4):-4], dtype="<u8").reshape(-1, 2)
    return [(int(o), int(n)) for o, n in index]


def chunk_reads(reads, array_dir: Path, inner_chunks: int) -> set[tuple[int, int]]:
    """(shard, inner chunk) of every data read of one array; fails on a whole-shard read."""
    prefix = f"{array_dir.parent.name}/{array_dir.name}/c/"
    touched = set()
    for key, byte_range in reads:
        if not key.startswith(prefix):
            continue
        shard = int(key[len(prefix):].split("/")[0])
        slices = shard_index(array_dir / "c" / str(shard) / "0", inner_chunks)
        if isinstance(byte_range, RangeByteRequest):
            touched.add((shard, slices.index((byte_range.start,
                                              byte_range.end - byte_range.start))))
        else:  # the index at the end is read by suffix; any other read is a whole shard
            assert byte_range is not None and not hasattr(byte_range, "offset"), (key, byte_range)
    return touched


@pytest.fixture()
def synthetic(storage):
    """A run's arrays written by the functions extraction uses, in uneven commits, from known
    dense matrices; run.json holds the widths the mask reader needs."""
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((ROWS, WIDTH)).astype(np.float16)
    bits = rng.random((ROWS, WIDTH)) < 0.3
    packed = np.packbits(bits, axis=1, bitorder="little")
    group = arrays.open_group(storage.arrays("syn"))
    a = arrays.ensure_rows_array(group, "acts/L0", width=WIDTH, dtype="float16", chunk_rows=CHUNK,
                                 compress=False, block=arrays.ACTS_BLOCK)
    m = arrays.ensure_rows_array(group, "active/L0", width=packed.shape[1], dtype="uint8",
                                 chunk_rows=CHUNK, compress=True, block=arrays.MASK_BLOCK)
    for start, stop in ((0, 100), (100, 128), (128, ROWS)):
        arrays.write_rows(a, start, acts[start:stop])
        arrays.write_rows(m, start, packed[start:stop])
    write_json(storage.run_manifest("syn"), {"model": {"widths": [WIDTH]}})
    return storage, acts, bits


def test_layout_is_neuron_blocked_in_row_shards(synthetic):
    storage, _, _ = synthetic
    group = arrays.open_group(storage.arrays("syn"), mode="r")
    acts, mask = group["acts/L0"], group["active/L0"]
    assert arrays.chunk_blocks(acts) == ((CHUNK, arrays.ACTS_BLOCK), (CHUNK, 3 * arrays.ACTS_BLOCK))
    assert arrays.chunk_blocks(mask) == ((CHUNK, arrays.MASK_BLOCK), (CHUNK, 2 * arrays.MASK_BLOCK))
    # one file per shard of rows, as before neuron blocks
    files = sorted(p.relative_to(storage.arrays("syn") / "acts" / "L0")
                   for p in (storage.arrays("syn") / "acts" / "L0" / "c").rglob("*") if p.is_file())
    assert [str(f) for f in files] == [f"c/{i}/0" for i in range(4)]
    narrow = arrays.ensure_rows_array(arrays.open_group(storage.arrays("syn")), "included", width=1, dtype="uint8", chunk_rows=CHUNK, compress=True,
                                      block=arrays.MASK_BLOCK)
    assert arrays.chunk_blocks(narrow) == ((CHUNK, 1), (CHUNK, 1)) and narrow.shards is None


@pytest.mark.parametrize("neuron", [0, 300, 599])
def test_one_neuron_of_acts_reads_only_its_chunks(synthetic, recorded, neuron):
    storage, acts, _ = synthetic
    con = connect(storage)
    try:
        got = con.sql("select row, value from neuron_values('syn', 'acts', 0, $n) order by row",
                      params={"n": neuron}).fetchnumpy()
    finally:
        con.close()
    assert np.array_equal(got["row"], np.arange(ROWS))
    assert np.array_equal(got["value"], acts[:, neuron].astype(np.float64))
    touched = chunk_reads(recorded, storage.arrays("syn") / "acts" / "L0", 3)
    assert touched == {(shard, neuron // arrays.ACTS_BLOCK) for shard in range(4)}
    assert not any(k.startswith("active/") for k, _ in recorded)


@pytest.mark.parametrize("neuron", [5, 550])
def test_one_neuron_of_masks_reads_only_its_chunks(synthetic, recorded, neuron):
    storage, _, bits = synthetic
    con = connect(storage)
    try:
        got = con.sql("select value from neuron_values('syn', 'active', 0, $n) order by row",
                      params={"n": neuron}).fetchnumpy()["value"]
    finally:
        con.close()
    assert np.array_equal(got, bits[:, neuron].astype(np.float64))
    touched = chunk_reads(recorded, storage.arrays("syn") / "active" / "L0", 2)
    assert touched == {(shard, neuron // (8 * arrays.MASK_BLOCK)) for shard in range(4)}


def test_a_layer_row_block_reads_whole_shards(synthetic, recorded):
    """Row blocks of a whole layer (co-activation, histogram, export) are one read per shard."""
    storage, acts, _ = synthetic
    group = arrays.open_group(storage.arrays("syn"), mode="r")
    assert np.array_equal(group["acts/L0"][64:192], acts[64:192])
    data = [(k, r) for k, r in recorded if k.startswith("acts/L0/c/")]
    assert sorted(data, key=lambda kr: kr[0]) == [("acts/L0/c/1/0", None), ("acts/L0/c/2/0", None)]


def test_runs_written_before_neuron_blocks_still_read_and_resume(storage):
    """A run with one chunk spanning each row block, as written before: reads agree, and a
    resumed extraction keeps its layout while appending rows."""
    rng = np.random.default_rng(4)
    acts = rng.standard_normal((ROWS, WIDTH)).astype(np.float16)
    group = zarr.open_group(str(storage.arrays("old")), mode="w")
    old = group.create_array(name="acts/L0", shape=(100, WIDTH), chunks=(CHUNK, WIDTH),
                             dtype="float16", fill_value=0, compressors=None)
    old[:] = acts[:100]
    write_json(storage.run_manifest("old"), {"model": {"widths": [WIDTH]}})
    resumed = arrays.ensure_rows_array(arrays.open_group(storage.arrays("old")), "acts/L0",
                                       width=WIDTH, dtype="float16", chunk_rows=CHUNK,
                                       compress=False, block=arrays.ACTS_BLOCK)
    arrays.write_rows(resumed, 100, acts[100:])
    again = arrays.open_group(storage.arrays("old"), mode="r")["acts/L0"]
    assert arrays.chunk_blocks(again) == ((CHUNK, WIDTH), (CHUNK, WIDTH))
    con = connect(storage)
    try:
        column = con.sql("select value from neuron_values('old', 'acts', 0, 301) order by row"
                         ).fetchnumpy()["value"]
        block = con.sql("select row, neuron, value from layer_values('old', 'acts', 0, 60, 70) "
                        "order by row, neuron").fetchnumpy()
    finally:
        con.close()
    assert np.array_equal(column, acts[:, 301].astype(np.float64))
    assert np.array_equal(block["value"], acts[60:70].astype(np.float64).ravel())
    assert np.array_equal(block["neuron"], np.tile(np.arange(WIDTH), 10))


# -- a real extraction of a micro GPT-2 with layers wider than a block


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, corpus_file):
    model = tmp_path_factory.mktemp("wide-gpt2")
    save_random_gpt2(model, n_layer=2, d_mlp=600)
    storage = Storage(tmp_path_factory.mktemp("wide"))
    assert main(["extract", "--storage", str(storage.root), "--model", str(model), "--corpus",
                 str(corpus_file), "--num-samples", "16", "--max-length", "16", "--batch-size",
                 "4", "--chunk-tokens", "64", "--store-acts", "--dtype", "float32", "--run", "w",
                 "--quiet"]) == 0
    tokens = tables.read_partition(storage, "tokens", "w").to_pydict()
    ids = torch.tensor(tokens["token_id"]).reshape(16, 16)
    return storage, mlp_inputs(model, ids), tokens


def test_extraction_writes_neuron_blocks(wide_run):
    storage, hooked, _ = wide_run
    group = zarr.open_group(str(storage.arrays("w")), mode="r")
    for layer in (0, 1):
        acts = group[f"acts/L{layer}"]
        assert acts.chunks == (64, arrays.ACTS_BLOCK) and acts.shards == (64, 768)
        assert group[f"active/L{layer}"].chunks == (64, arrays.MASK_BLOCK)
        # every column read alone equals the independent hook's (fp16-rounded) activations
        for n in (0, 255, 256, 599):
            assert np.array_equal(acts[:, n], hooked[layer][:, n].astype(np.float16))


def test_top_tokens_reads_only_the_neurons_chunks(wide_run, recorded):
    storage, hooked, tokens = wide_run
    top = run_top_tokens(TopTokensConfig(run="w", layer=1, neuron=420, k=6, context=2),
                         storage).frame
    column = hooked[1][:, 420].astype(np.float16).astype(np.float64)
    order = sorted(range(len(column)), key=lambda r: (-column[r], r))[:6]  # plain ordering
    assert top["row"].to_list() == order
    assert top["value"].to_list() == [column[r] for r in order]
    assert top["token"].to_list() == [tokens["token"][r] for r in order]
    touched = chunk_reads(recorded, storage.arrays("w") / "acts" / "L1", 3)
    assert touched == {(shard, 1) for shard in range(4)}
    assert {k.split("/c/")[0] for k, _ in recorded if "/c/" in k} == {"acts/L1"}


# -- export: bounded blocks, atomic, bad folders


@pytest.fixture(scope="module")
def prompts_run(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("ex"))
    assert main(["extract", "--storage", str(storage.root), "--model", str(micro_model_dir),
                 "--prompts", str(PROMPTS), "--active-threshold", "0.15", "--run", "e",
                 "--chunk-tokens", "16", "--quiet"]) == 0
    group = zarr.open_group(str(storage.arrays("e")), mode="r")
    masks = np.concatenate([np.unpackbits(np.asarray(group[f"active/L{l}"][:]), axis=1,
                                          bitorder="little")[:, :40] for l in range(3)], axis=1)
    return storage, masks.astype(np.int64), tables.read_partition(storage, "tokens", "e").to_pydict()


def test_export_in_small_blocks_equals_the_masks(prompts_run, tmp_path, monkeypatch):
    storage, masks, tokens = prompts_run
    spans = []
    real = export._active_rows
    monkeypatch.setattr(export, "_active_rows", lambda g, la, w, a, b: spans.append((a, b))
                        or real(g, la, w, a, b))
    out = tmp_path / "small"
    export.run(export.ExportConfig(run="e", out_dir=str(out), prefix="p", block_rows=5), storage)
    rows = len(masks)
    assert max(b - a for a, b in spans) <= 5 and sorted(spans)[0][0] == 0
    assert [r for a, b in sorted(spans) for r in range(a, b)] == list(range(rows))
    npz = np.load(out / "p_activation_matrix.npz", allow_pickle=True)
    ever = [n for n in range(masks.shape[1]) if masks[:, n].any()]
    assert npz["matrix"].dtype == np.int32 and np.array_equal(npz["matrix"], masks[:, ever])
    assert npz["neuron_ids"].tolist() == ever
    assert npz["neuron_map"].item() == {n: k for k, n in enumerate(ever)}
    active = json.loads((out / "p_neuron_activations.json").read_text())
    assert active == {str(r): np.flatnonzero(masks[r]).tolist() for r in range(rows)}
    with open(out / "p_activation_dataset.csv", newline="") as f:
        data = list(csv.DictReader(f))
    prompt_text: dict[int, str] = {}
    for s, tok, gen in zip(tokens["sample"], tokens["token"], tokens["generated"]):
        prompt_text[s] = prompt_text.get(s, "") + ("" if gen else tok)
    assert [d["input_text"] for d in data] == [prompt_text[s] for s in tokens["sample"]]
    assert [int(d["number_of_active_neurons"]) for d in data] == masks.sum(1).tolist()
    assert [d["output"] for d in data] == tokens["token"]


def test_failed_export_keeps_the_files_before_it(prompts_run, tmp_path, monkeypatch):
    storage, _, _ = prompts_run
    out = tmp_path / "keep"
    export.run(export.ExportConfig(run="e", out_dir=str(out), prefix="p"), storage)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = export._active_rows

    def dies(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(export, "_active_rows", dies)
    with pytest.raises(RuntimeError):
        export.run(export.ExportConfig(run="e", out_dir=str(out), prefix="p", block_rows=4,
                                       overwrite=True), storage)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries either


def test_export_refuses_bad_folders_in_one_line(prompts_run, tmp_path, capsys):
    storage, _, _ = prompts_run
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    clash = tmp_path / "clash"
    (clash / "p_neuron_frequency.csv").mkdir(parents=True)
    for out, words in ((taken, "is a file"), (taken / "sub", "is a file"),
                       (dangling, "missing"), (clash, "is a folder")):
        assert main(["export", "--storage", str(storage.root), "--run", "e", "--out-dir",
                     str(out), "--prefix", "p"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert taken.read_text() == "keep me" and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in clash.iterdir()) == ["p_neuron_frequency.csv"]
    with pytest.raises(UserError, match="block_rows"):
        export.ExportConfig(run="e", out_dir=str(tmp_path), block_rows=0)


def test_acts_layers_without_store_acts_is_refused(storage, capsys, micro_model_dir):
    assert main(["extract", "--storage", str(storage.root), "--model", str(micro_model_dir),
                 "--acts-layers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --acts-layers") and "--store-acts" in err
    assert err.count("\n") == 1 and not storage.root.exists()


def test_resumed_prompts_run_rewrites_partial_shards_exactly(tmp_path, monkeypatch):
    """Prompt units end anywhere in a shard, so commits rewrite part of a sharded chunk; a crash
    after a commit's arrays are written resumes to the activations of an independent hook."""
    import pipeline.stages.extract as ex

    model = tmp_path / "wide-gpt2"
    save_random_gpt2(model, n_layer=2, d_mlp=600)
    config = ex.ExtractConfig(model=str(model), prompts=str(PROMPTS), chunk_tokens=24,
                              commit_seconds=0, store_acts=True, dtype="float32", run="p",
                              quiet=True)
    storage = Storage(tmp_path / "wh")
    real, calls = tables.write_part, []

    def crash(storage_, table, run_id, data, part="part-0"):
        real(storage_, table, run_id, data, part)
        if table == "tokens":
            calls.append(len(data["row"]))
            if len(calls) == 3:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(ex.tables, "write_part", crash)
    with pytest.raises(RuntimeError):
        ex.run(config, storage)
    monkeypatch.setattr(ex.tables, "write_part", real)
    assert any(sum(calls[:i]) % 24 for i in (1, 2, 3))  # a commit ended inside a shard
    ex.run(config, storage)
    tokens = tables.read_partition(storage, "tokens", "p").to_pydict()
    group = zarr.open_group(str(storage.arrays("p")), mode="r")
    samples = np.asarray(tokens["sample"])
    for layer in (0, 1):
        acts = group[f"acts/L{layer}"]
        assert acts.shards == (24, 768) and acts.shape == (len(samples), WIDTH)
        stored = acts[:]
        for s in np.unique(samples):
            rows = np.flatnonzero(samples == s)
            ids = torch.tensor(tokens["token_id"])[rows]
            want = mlp_inputs(model, ids)[layer].astype(np.float16)
            np.testing.assert_allclose(stored[rows].astype(np.float32), want.astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
