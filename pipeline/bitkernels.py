"""numba kernels over bit-packed masks: transposition to neuron-major bitsets, AND + popcount.

Imported lazily (numba takes a moment to load). The kernels are module-level functions with
`cache=True`, so they are compiled once and later processes load the cached machine code from
__pycache__ (kernels built inside a closure miss that cache and recompile in every process).

    packed   uint8  [t, ceil(w/8)]    token-major, bit n%8 (little-endian) of byte n//8 = neuron n
    bitsets  uint64 [w, ceil(t/64)]   neuron-major, bit r%64 of word r//64 = token row r
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

TILE_I = 64  # rows of a per parallel task (64 KiB of bitsets at 8,192 tokens)
TILE_J = 128  # rows of b per block: 128 KiB at 8,192 tokens, stays in L2 across the task's rows


@intrinsic
def popcount64(typingctx, x):
    """The hardware population count of a uint64 (LLVM ctpop -> popcnt)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(inline="always")
def _transpose8x8(x):
    """Transpose the 8 x 8 bit matrix held in a uint64 (bit 8r + k <-> bit 8k + r)."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@njit(parallel=True, cache=True, nogil=True)
def to_bitsets(packed, width, out):
    """Token-major packed bytes [t, nb] -> neuron-major bitsets out [width, ceil(t/64)].

    Per 64-row word and byte column: 8 groups of 8 rows are gathered into a uint64 (byte r =
    row r) and bit-transposed (byte k = the 8 rows of neuron k); byte g of neuron k's word is
    then byte k of group g.
    """
    t, nb = packed.shape
    for w in prange(out.shape[1]):
        r0 = w * 64
        n = min(64, t - r0)
        words = np.zeros(8, np.uint64)
        for b in range(nb):
            kmax = min(8, width - b * 8)
            words[:] = 0
            for g in range(8):
                x = np.uint64(0)
                for r in range(min(8, n - g * 8)):
                    x |= np.uint64(packed[r0 + g * 8 + r, b]) << np.uint64(8 * r)
                if x:
                    y = _transpose8x8(x)
                    for k in range(kmax):
                        words[k] |= ((y >> np.uint64(8 * k)) & np.uint64(0xFF)) << np.uint64(8 * g)
            for k in range(kmax):
                out[b * 8 + k, w] = words[k]


@njit(inline="always")
def _dot(a, b, i, j):
    s = np.uint64(0)
    for w in range(a.shape[1]):
        s += popcount64(a[i, w] & b[j, w])
    return np.int64(s)


@njit(parallel=True, cache=True, nogil=True)
def and_popcount(a, b, out):
    """out[i, j] += sum_w popcount(a[i, w] & b[j, w]) for bitsets a [da, W], b [db, W]; out int64.

    Parallel over blocks of TILE_I rows of a; within a block, b is walked in blocks of TILE_J
    rows (they stay in cache across the block's rows) and a in tiles of 4 rows (each word of b
    loaded once feeds 4 AND + popcounts).
    """
    da, words = a.shape
    db = b.shape[0]
    for ib in prange((da + TILE_I - 1) // TILE_I):
        i_end = min(ib * TILE_I + TILE_I, da)
        for j0 in range(0, db, TILE_J):
            j_end = min(j0 + TILE_J, db)
            for i in range(ib * TILE_I, i_end, 4):
                if i + 4 <= i_end:
                    a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
                    for j in range(j0, j_end):
                        bj = b[j]
                        s0 = s1 = s2 = s3 = np.uint64(0)
                        for w in range(words):
                            x = bj[w]
                            s0 += popcount64(a0[w] & x)
                            s1 += popcount64(a1[w] & x)
                            s2 += popcount64(a2[w] & x)
                            s3 += popcount64(a3[w] & x)
                        out[i, j] += np.int64(s0)
                        out[i + 1, j] += np.int64(s1)
                        out[i + 2, j] += np.int64(s2)
                        out[i + 3, j] += np.int64(s3)
                else:  # the last 1-3 rows of the block
                    for k in range(i, i_end):
                        for j in range(j0, j_end):
                            out[k, j] += _dot(a, b, k, j)
