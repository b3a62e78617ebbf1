"""Compute kernels: numba/LLVM bit kernels, union-find, streaming accumulators."""
