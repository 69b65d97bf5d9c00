"""Host memory tuning for long runs on glibc (a no-op elsewhere).

glibc serves every request above its mmap threshold (at most 32 MiB when left to adapt)
with a fresh ``mmap`` that is returned on ``free``: each temporary the size of a detector
plane then pays its page faults anew. :func:`tune_host_allocator` keeps such blocks in the
heap; :func:`release_freed_memory` hands freed pages back between exposures, so a run's
footprint stays flat. See ``docs/benchmarks.md`` for what each measured.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

__all__ = ["tune_host_allocator", "release_freed_memory"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@lru_cache(maxsize=1)
def tune_host_allocator(limit: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes, so exposure-sized blocks
    are reused instead of mapped afresh. Called by the CPU backend; returns False off glibc,
    or when ``GPUDIFFIM_TUNE_MALLOC=0``."""
    if os.environ.get("GPUDIFFIM_TUNE_MALLOC", "1") == "0":
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, 2 * limit))
    log.debug("host allocator thresholds raised to %d bytes: %s", limit, ok)
    return ok


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``). Exposure-sized arrays
    freed by one thread and reallocated by another otherwise pile up in the allocator's
    arenas, and a long run's footprint creeps up."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
