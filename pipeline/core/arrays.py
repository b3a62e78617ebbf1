"""Zarr v3 arrays of a run: dense activations, bit-packed active masks, co-activation counts.

    acts/L<l>            float16 [T, d_mlp]          (optional, `--store-acts`)
    active/L<l>          uint8   [T, ceil(d_mlp/8)]  bit n%8 (little-endian) of byte n//8 = neuron n,
                                                     set iff the run's active rule holds
    gate/L<l>, up/L<l>   uint8   [T, ceil(d_mlp/8)]  g > 0 and u > 0 of gated MLPs, packed alike
    experts/L<l>         int16   [T, top_k]          experts each token was routed to (MoE layers)
    expert_weights/L<l>  float16 [T, top_k]          their routing weights
    included             uint8   [T, 1]              1 iff the row enters the accumulators
    coact/L<a>_L<b>      int64   [d_a, d_b]

Row r of every array but coact is row r of the run's `tokens` table.

Chunk layout (per array; readers slice and never assume it, so runs written before keep reading):
a row array is cut into shards of `chunk_rows` rows spanning every column (one file each), and
the dense and mask arrays split each shard into neuron blocks (inner chunks of ACTS_BLOCK
neurons, MASK_BLOCK bytes = 8 * MASK_BLOCK neurons), so a one-neuron read `a[:, n]` reads and
decompresses only its block of each shard, while a row block of a whole layer is still one file
read per shard. Arrays no wider than a block, and runs written before neuron blocks, have one
chunk per shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

BITORDER = "little"
# Measured at gpt2-small width (benchmarks/neuron_read.py, 1M rows): one neuron reads 1/12 of
# an acts layer's bytes (3-5x faster) and 1/6 of a mask layer's (1.3-2x); the price is ~1.4-1.9x
# the CPU per byte written and ~1.6-2x per whole-layer row read (zarr assembles each shard from
# its inner chunks). Narrower blocks add per-chunk work for little less read time; mask blocks
# are wider because co-activation reads whole mask rows and mask chunks are small.
ACTS_BLOCK = 256  # neurons per inner chunk of acts/L<l>
MASK_BLOCK = 64   # bytes per inner chunk of active/gate/up L<l> (512 neurons)


def open_group(path: Path, mode: str = "a") -> zarr.Group:
    """The Zarr group at a folder, or at a prefix of object storage (FsspecStore, through the
    root's filesystem options). On object storage each chunk and metadata file is one PUT, so
    a reader sees a chunk whole or not at all; which rows count is the run's manifest's say."""
    from pipeline.core.storage import is_remote

    if is_remote(path):
        from zarr.storage import FsspecStore

        # the options of the root's filesystem; zarr makes an asynchronous one of them
        store = FsspecStore.from_url(str(path), storage_options=dict(path.storage_options),
                                     read_only=mode == "r")
        return zarr.open_group(store=store, mode=mode)
    return zarr.open_group(store=str(path), mode=mode)


def packed_width(width: int) -> int:
    return (width + 7) // 8


def chunk_layout(width: int, chunk_rows: int, block: int | None) -> dict:
    """create_array's chunks (and shards) of a [rows, width] array: one chunk of chunk_rows rows
    spanning every column, or with `block` a shard of chunk_rows rows cut into column blocks."""
    if block is None or width <= block:
        return {"chunks": (chunk_rows, width)}
    # a shard is a whole number of blocks; the last one may reach past the array's edge
    return {"chunks": (chunk_rows, block), "shards": (chunk_rows, -(-width // block) * block)}


def chunk_blocks(array: zarr.Array) -> tuple[tuple[int, int], tuple[int, int]]:
    """(inner chunk shape, shard shape) of a row array as written; equal when it has no shards."""
    inner = tuple(array.chunks)
    return inner, tuple(array.shards) if array.shards is not None else inner


def ensure_rows_array(
    group: zarr.Group, name: str, *, width: int, dtype: str, chunk_rows: int, compress: bool,
    block: int | None = None,
) -> zarr.Array:
    """A [rows, width] array growing along rows; created empty if absent (an existing one keeps
    the layout it was written with). `block`: columns per inner chunk (see chunk_layout).

    Opened with write_empty_chunks: an all-zero chunk is written like any other instead of being
    compared with the fill value first, a check that costs more than the write itself (reads
    are the same either way); masks reach disk 1.7x (zstd) to 2x (uncompressed) faster.
    """
    if name not in group:
        group.create_array(
            name=name, shape=(0, width), dtype=dtype, **chunk_layout(width, chunk_rows, block),
            compressors=[ZstdCodec(level=1)] if compress else None, fill_value=0,
        )
    return group[name].with_config({"write_empty_chunks": True})


def write_rows(array: zarr.Array, start: int, block: np.ndarray) -> None:
    stop = start + block.shape[0]
    if array.shape[0] < stop:
        array.resize((stop, array.shape[1]))
    array[start:stop] = block


ROW_KINDS = ("acts", "active", "gate", "up", "experts", "expert_weights")  # groups of L<l> arrays
INCLUDED = "included"


def truncate_rows(group: zarr.Group, rows: int) -> None:
    """Cut every row array back to `rows` (drops rows written after the last commit)."""
    row_arrays = [group[INCLUDED]] if INCLUDED in group else []
    for kind in ROW_KINDS:
        if kind in group:
            row_arrays += [array for _, array in group[kind].arrays()]
    for array in row_arrays:
        if array.shape[0] != rows:
            array.resize((rows, array.shape[1]))


def included_rows(group: zarr.Group, start: int, stop: int) -> np.ndarray | None:
    """Whether rows start..stop-1 enter the accumulators (bool); None when all do (also for runs
    written before rows could be excluded)."""
    if INCLUDED not in group:
        return None
    rows = group[INCLUDED][start:stop, 0].astype(bool)
    return None if rows.all() else rows


def pack_mask(active) -> np.ndarray:
    """Bit-pack a boolean [tokens, width] torch tensor (any device) into uint8 [tokens, ceil(width/8)]."""
    import torch

    tokens, width = active.shape
    pad = (-width) % 8
    if pad:
        active = torch.nn.functional.pad(active, (0, pad))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=active.device)
    packed = (active.view(tokens, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    return packed.cpu().numpy()


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """Boolean [tokens, width] from packed uint8 rows."""
    return np.unpackbits(packed, axis=1, count=width, bitorder=BITORDER).astype(bool)


def layer_array(group: zarr.Group, kind: str, layer: int) -> zarr.Array:
    return group[f"{kind}/L{layer}"]


# -- co-activation count arrays coact/L<a>_L<b>


def pair_name(a: int, b: int) -> str:
    """Zarr path of the counts of layers a and b in a run's group."""
    return f"coact/L{a}_L{b}"


def parse_pair_key(key: str) -> tuple[int, int]:
    """(a, b) of a pair key 'L<a>_L<b>' (the name of an array in the coact group)."""
    a, b = key.split("/")[-1].split("_")
    return int(a[1:]), int(b[1:])
