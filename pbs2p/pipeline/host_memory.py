"""Giving freed host memory back to the operating system between blocks.

glibc's ``malloc`` keeps freed memory inside the process when it cannot shrink the top of its heap,
so a block-by-block run whose every block allocates and frees the same few hundred megabytes grows
its resident set block after block (measured with ``benchmarks/onload_memory.py``: +29 % of peak
RSS from 2 to 16 blocks). :func:`release_free_memory` calls glibc's ``malloc_trim(0)``, which returns
every free page of every arena; the block loop calls it when a block is closed and after each stage
of linears. Elsewhere (macOS, Windows, musl) it does nothing. It frees no live tensor and changes no
value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); ``False`` where there is no glibc.

    Example:
        >>> from pbs2p.pipeline.host_memory import release_free_memory
        >>> isinstance(release_free_memory(), bool)
        True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
