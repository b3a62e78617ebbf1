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
    """Rows start.. of a row array. Every chunk file the rows cover whole is encoded here and
    put straight to the array's store (see ChunkFormat); rows of a chunk they cover in part go
    through zarr, which merges them with the chunk's other rows."""
    stop = start + block.shape[0]
    if array.shape[0] < stop:
        array.resize((stop, array.shape[1]))
    form = ChunkFormat.of(array)
    if form is None:
        array[start:stop] = block
        return
    rows, c = array.shape[0], form.rows
    # chunks first..last-1 lie whole in start..stop-1; the array's last chunk ends at its rows
    first, last = -(-start // c), (-(-stop // c) if stop == rows else stop // c)
    if last <= first:
        array[start:stop] = block
        return
    lo, hi = first * c, min(last * c, rows)
    if start < lo:
        array[start:lo] = block[:lo - start]
    for k in range(first, last):
        a, b = k * c, min((k + 1) * c, rows)
        form.put(array, k, block[a - start:b - start])
    if hi < stop:
        array[hi:stop] = block[hi - start:]


class ChunkFormat:
    """The chunk files of a row array of one of the layouts ensure_rows_array creates, encoded
    here instead of by zarr.

    zarr-python spends more on its per-chunk machinery (asyncio tasks, indexers, buffer copies
    per inner chunk) than on the bytes (benchmarks/writer.py: here raw masks write 3-3.5x and
    dense fp16 2-2.5x faster, on 2.5-3.7x less CPU). A whole chunk file here is one transposing
    copy into the output buffer (plus zstd per inner chunk where compressed) and one store put:
    the bytes are those zarr writes (the format of the sharding_indexed codec: inner chunks in
    their Morton order, which is column order for a one-row grid, then an index of (offset,
    length) uint64 pairs and its crc32c), so zarr reads them as its own. Arrays of any other
    layout (arrays written by other versions, say) keep zarr's own path: of() returns None.
    """

    def __init__(self, rows: int, width: int, block: int | None, zstd, dtype: np.dtype):
        self.rows, self.width, self.block, self.dtype = rows, width, block, dtype
        self.zstd = zstd  # numcodecs Zstd of the (inner) chunks, or None: stored raw

    @classmethod
    def of(cls, array: zarr.Array) -> ChunkFormat | None:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or array.ndim != 2 or \
                getattr(meta.chunk_key_encoding, "name", None) != "default":
            return None
        dtype = np.dtype(array.dtype)
        if dtype.byteorder == ">" or np.asarray(meta.fill_value).any():
            return None  # big-endian, or padding that is not zero
        codecs = list(meta.codecs)
        block = None
        outer = tuple(array.chunks if array.shards is None else array.shards)
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            index = list(shard.index_codecs)
            if shard.index_location.value != "end" or len(index) != 2 or not (
                    isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)):
                return None
            inner = tuple(shard.chunk_shape)
            if inner[0] != outer[0] or outer[1] % inner[1]:
                return None
            codecs, block = list(shard.codecs), inner[1]
        if outer[1] < array.shape[1] or not codecs or not isinstance(codecs[0], BytesCodec):
            return None  # more than one chunk across the columns, or no bytes codec first
        zstd = None
        if len(codecs) == 2:
            from numcodecs import Zstd
            from zarr.codecs import ZstdCodec

            if not isinstance(codecs[1], ZstdCodec):
                return None
            zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        elif len(codecs) != 1:
            return None
        return cls(outer[0], outer[1], block, zstd, dtype)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """The bytes (uint8) of a chunk file holding `rows` (at most self.rows; zero-padded)."""
        n, width = rows.shape
        if n < self.rows or width < self.width:
            padded = np.zeros((self.rows, self.width), self.dtype)
            padded[:n, :width] = rows
            rows = padded
        rows = rows.astype(self.dtype, copy=False)
        if self.block is None:
            raw = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
            return raw if self.zstd is None else np.frombuffer(self.zstd.encode(raw), np.uint8)
        blocks = self.width // self.block
        pieces = rows.reshape(self.rows, blocks, self.block).transpose(1, 0, 2)
        piece_bytes = self.rows * self.block * self.dtype.itemsize
        if self.zstd is None:
            lengths = [piece_bytes] * blocks
            body_bytes = piece_bytes * blocks
            out = np.empty(body_bytes + 16 * blocks + 4, np.uint8)
            out[:body_bytes].view(self.dtype).reshape(pieces.shape)[...] = pieces
        else:
            encoded = [self.zstd.encode(np.ascontiguousarray(p)) for p in pieces]
            lengths = [len(e) for e in encoded]
            body_bytes = sum(lengths)
            out = np.empty(body_bytes + 16 * blocks + 4, np.uint8)
            at = 0
            for e in encoded:
                out[at:at + len(e)] = np.frombuffer(e, np.uint8)
                at += len(e)
        index = np.empty((blocks, 2), "<u8")
        index[:, 1] = lengths
        index[:, 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[body_bytes:-4] = index.view(np.uint8).reshape(-1)
        import google_crc32c

        crc = np.array([google_crc32c.value(out[body_bytes:-4].tobytes())], "<u4")
        out[-4:] = crc.view(np.uint8)
        return out

    def put(self, array: zarr.Array, k: int, rows: np.ndarray) -> None:
        """Write chunk file k (rows k*self.rows..) of `array` from `rows`."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        prefix = array.store_path.path
        key = array.metadata.encode_chunk_key((k, 0))
        key = f"{prefix}/{key}" if prefix else key
        value = default_buffer_prototype().buffer.from_array_like(self.encode(rows))
        store = array.store_path.store
        if hasattr(store, "set_sync"):  # a local folder: written to a temporary file, renamed
            store.set_sync(key, value)
        else:
            sync(store.set(key, value))


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
