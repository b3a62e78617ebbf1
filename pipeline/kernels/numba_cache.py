"""Where numba caches the compiled kernels, decided once before any kernel is decorated.

numba's `cache=True` raises at decoration (so at import) when it finds no writable folder: an
installation without a writable __pycache__ (read-only site-packages, a container image) and no
usable NUMBA_CACHE_DIR would make every kernel module unimportable. The kernels are decorated
with `cache=CACHE` instead, where CACHE is True only if a writable folder was found:

1. NUMBA_CACHE_DIR when set and writable (numba prefers it over __pycache__: the user asked);
2. the __pycache__ beside the kernel modules;
3. a per-user folder under tempfile.gettempdir(), set as numba's cache folder.

Otherwise caching is off: the kernels still work and are compiled in every process.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from numba.core import config as numba_config

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent


def writable_dir(path: str | Path) -> bool:
    """Whether `path` is (or can be made) a folder in which files can be created (numba's test)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def user_temp_cache_dir() -> Path:
    """A per-user cache folder under the system's temporary folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"nwh-numba-cache-{user}"


def choose_cache_dir() -> str | None:
    """Configure numba's cache folder; returns the folder used, or None when none is writable."""
    requested = os.environ.get("NUMBA_CACHE_DIR", "")
    if requested and writable_dir(requested):
        return requested
    in_tree = KERNEL_DIR / "__pycache__"
    if writable_dir(in_tree):
        return str(in_tree)
    fallback = user_temp_cache_dir()
    if writable_dir(fallback):
        # both the environment (so a later reload of numba's config keeps it) and the live config
        os.environ["NUMBA_CACHE_DIR"] = numba_config.CACHE_DIR = str(fallback)
        return str(fallback)
    log.debug("no writable numba cache folder (%s, %s, %s): kernels compile in every process",
              requested or "NUMBA_CACHE_DIR unset", in_tree, fallback)
    return None


CACHE_DIR = choose_cache_dir()
CACHE = CACHE_DIR is not None
