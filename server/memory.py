"""The HTTP process's allocator settings: image buffers freed by one request stay for the next.

Every request's image is decoded and preprocessed in a worker thread (`server.images.ImagePrep`), so its
buffers (decoded RGB, resized, the float32 pixels: ~0.6 MB at 224 px) come from that thread's glibc arena;
the pixel tensor is freed later by the event loop's thread, once the request is answered. When that free
leaves more than glibc's trim threshold free at the top of the worker's heap, glibc hands the pages back
(`madvise(MADV_DONTNEED)`), and the next image in that thread faults them in again: ~200 page faults and
0.6-0.9 ms of kernel time per request on a 2-core CPU (bench/load.py at 16 clients). glibc's thresholds move
on their own (each raised to the size of the largest mmap'd block freed so far, up to 32 MiB and 64 MiB), so
whether the trims happened depended on which blocks some import happened to free at start-up. Fixed at the
top of that dynamic range they are deterministic: blocks up to `MMAP_THRESHOLD` (a decoded 12-megapixel
photo is 36 MB, above it; a 1080p one 6.2 MB, below) come from the arenas, and free memory at the top of a
heap is handed back only beyond `TRIM_THRESHOLD`: what glibc itself does once it has seen a large block.
Source: glibc `mallopt(3)`: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (setting either turns off the dynamic ones).

Only there: the same thresholds cost page faults elsewhere (2-core CPU, bench/load.py at 64 clients, with
a 4 MiB / 16 MiB pair): the engine process went from 14-44 to ~195 faults per request, and a server with
`--engine thread` at 16 clients from ~0 to ~100, so both keep glibc's own (the engine process is spawned:
it does not inherit this process's settings). An operator's own choice wins: with MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or a malloc threshold in GLIBC_TUNABLES set, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Bytes: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems, and twice it (the trim threshold glibc's
# dynamic rule sets beside it).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (bytes; see the module's docstring).

    Returns True if both were set; False where the C library is not glibc (nothing is changed: musl,
    macOS), where the environment sets a malloc threshold already (the operator's choice stays), or glibc
    refused a value. Raises ValueError unless 0 < mmap_threshold <= 32 MiB and trim_threshold > 0.
    Called once at start-up by each HTTP process of a process engine."""
    if not 0 < mmap_threshold <= MMAP_THRESHOLD or trim_threshold <= 0:
        raise ValueError(
            f"mmap_threshold must be in (0, {MMAP_THRESHOLD}] and trim_threshold > 0 bytes, got "
            f"{mmap_threshold} and {trim_threshold}"
        )
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(v) for v in _OPERATOR_SETTINGS) or any(t in tunables for t in _TUNABLES):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already has loaded
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has a mallopt that does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
