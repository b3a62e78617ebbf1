"""Chunk files that arrays.write_rows encodes itself (ChunkFormat), against zarr-python's own
codec pipeline: the same data written through `array[:] = data` must give the same bytes in
every chunk file, zarr must read the rows back as written, and arrays of other layouts keep
zarr's path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from pipeline.core import arrays

LAYOUTS = [  # width, dtype, compress, block: the layouts an extraction writes, and odd widths
    (384, "uint8", True, 64),     # masks of gpt2-small width
    (20, "uint8", True, 8),       # the last block reaches past the edge
    (600, "float16", False, 256),  # dense, 3 blocks, the last one partial
    (1, "uint8", True, None),     # `included`
    (3, "int16", True, None),     # experts
    (33, "float16", True, 8),
]
CHUNK = 64


def _data(width: int, dtype: str, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal((rows, width)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -300), min(info.max, 300), (rows, width)).astype(dtype)


def _chunk_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json"}


def _by_zarr(folder: Path, data: np.ndarray, **spec) -> None:
    array = arrays.ensure_rows_array(arrays.open_group(folder), "x", chunk_rows=CHUNK, **spec)
    array.resize(data.shape)
    array[:] = data  # zarr's own codec pipeline, chunk by chunk


@pytest.mark.parametrize("width,dtype,compress,block", LAYOUTS)
@pytest.mark.parametrize("splits", [[], [30], [64, 128], [1, 100, 129, 191], [200]])
def test_write_rows_gives_zarr_bytes(tmp_path, width, dtype, compress, block, splits):
    rows = 3 * CHUNK + 17  # the last chunk partial
    data = _data(width, dtype, rows)
    spec = dict(width=width, dtype=dtype, compress=compress, block=block)
    _by_zarr(tmp_path / "zarr", data, **spec)
    array = arrays.ensure_rows_array(arrays.open_group(tmp_path / "nwh"), "x", chunk_rows=CHUNK,
                                     **spec)
    assert arrays.ChunkFormat.of(array) is not None
    edges = [0, *splits, rows]
    for a, b in zip(edges, edges[1:]):  # one commit per slice, as the extraction's writer does
        arrays.write_rows(array, a, data[a:b])
    back = zarr.open_group(str(tmp_path / "nwh"), mode="r")["x"]
    assert back.shape == data.shape
    np.testing.assert_array_equal(back[:].view(np.uint8), data.view(np.uint8))
    np.testing.assert_array_equal(back[:, width - 1], data[:, width - 1])
    ours, theirs = _chunk_files(tmp_path / "nwh"), _chunk_files(tmp_path / "zarr")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_whole_chunks_skip_zarr_and_partial_ones_merge(tmp_path, monkeypatch):
    """Chunks a commit covers whole (to the array's end) are put directly, the rest merged by
    zarr with what the earlier commit wrote."""
    data = _data(384, "uint8", 300)
    array = arrays.ensure_rows_array(arrays.open_group(tmp_path), "x", width=384, dtype="uint8",
                                     chunk_rows=CHUNK, compress=True, block=64)
    puts: list[int] = []
    real = arrays.ChunkFormat.put
    monkeypatch.setattr(arrays.ChunkFormat, "put",
                        lambda self, arr, k, rows: (puts.append(k), real(self, arr, k, rows)))
    for a, b in [(0, 100), (100, 250), (250, 300)]:
        arrays.write_rows(array, a, data[a:b])
    # by hand, chunks of 64 rows: the first commit covers 0 and 1 (64..99, the array's end)
    # whole; the second 2 and 3 (192..249, its end then), merging 100..127 into chunk 1; the
    # third 4 (256..299), merging 250..255 into chunk 3
    assert puts == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path), mode="r")["x"][:], data)


def test_truncated_array_is_rewritten(tmp_path):
    """After truncate_rows (a resume drops rows past the last commit) new rows overwrite the
    dropped ones, in a chunk zarr keeps and in chunks it removed."""
    data, other = _data(20, "uint8", 200), _data(20, "uint8", 200, seed=1)
    group = arrays.open_group(tmp_path)
    array = arrays.ensure_rows_array(group, "active/L0", width=20, dtype="uint8",
                                     chunk_rows=CHUNK, compress=True, block=8)
    arrays.write_rows(array, 0, other)
    arrays.truncate_rows(group, 50)
    arrays.write_rows(group["active/L0"], 50, data[50:])
    expected = np.concatenate([other[:50], data[50:]])
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path), mode="r")["active/L0"][:],
                                  expected)


def _other_layouts(group: zarr.Group) -> dict[str, zarr.Array]:
    return {
        "gzip": group.create_array("gzip", shape=(0, 20), dtype="uint8", chunks=(CHUNK, 20),
                                   compressors=[GzipCodec()], fill_value=0),
        "two shard columns": group.create_array(
            "cols", shape=(0, 20), dtype="uint8", chunks=(CHUNK, 5), shards=(CHUNK, 10),
            fill_value=0),
        "column chunks": group.create_array("colchunks", shape=(0, 20), dtype="uint8",
                                            chunks=(CHUNK, 10), fill_value=0),
        "fill value 7": group.create_array("fill", shape=(0, 20), dtype="uint8",
                                           chunks=(CHUNK, 20), fill_value=7),
        "big-endian": group.create_array("big", shape=(0, 20), dtype=">i2",
                                         chunks=(CHUNK, 20), fill_value=0),
    }


def test_other_layouts_keep_zarrs_path(tmp_path):
    group = zarr.open_group(str(tmp_path / "v3"), mode="w")
    layouts = _other_layouts(group)
    v2 = zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    layouts["zarr v2"] = v2.create_array("x", shape=(0, 20), dtype="uint8", chunks=(CHUNK, 20),
                                         fill_value=0)
    for name, array in layouts.items():
        assert arrays.ChunkFormat.of(array) is None, name
        data = _data(20, "int16" if array.dtype.itemsize == 2 else "uint8", 150)
        data = data.astype(array.dtype)
        arrays.write_rows(array, 0, data[:70])
        arrays.write_rows(array, 70, data[70:])
        np.testing.assert_array_equal(array[:], data, err_msg=name)
