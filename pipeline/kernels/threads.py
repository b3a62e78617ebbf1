"""How the cores are split between torch's matmuls and numba's kernels during extraction."""

from __future__ import annotations


def configure_threads(device_type: str) -> dict[str, int]:
    """Set torch and numba thread counts for an extraction on `device_type`; returns them."""
    import torch

    return {"torch": torch.get_num_threads()}
