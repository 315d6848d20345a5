"""The HTTP process's allocator settings: image buffers freed by one request stay for the next.

Every request's image is decoded and preprocessed in a worker thread (`server.images.ImagePrep`), so its
buffers (decoded RGB, resized, the float32 pixels: ~0.6 MB at 224 px) come from that thread's glibc arena;
the pixel tensor is freed later by the event loop's thread, once the request is answered. When that free
leaves more than glibc's trim threshold free at the top of the worker's heap, glibc hands the pages back
(`madvise(MADV_DONTNEED)`), and the next image in that thread faults them in again: about 180 page faults,
~0.5 ms of kernel time per request on a 2-core CPU (bench/load.py at 16 clients). glibc's thresholds move
on their own (raised to the size of the largest mmap'd block freed so far), so whether the trims happen
depended on which blocks some import happened to free at start-up. Fixed thresholds make it deterministic:
blocks up to `MMAP_THRESHOLD` come from the arenas, and up to `TRIM_THRESHOLD` free at a heap's top stays
for the next request (at most that much per worker thread's arena held beyond what is in use).
Source: glibc `mallopt(3)`: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (setting either turns off the dynamic ones).

Only there: the same thresholds cost page faults elsewhere (2-core CPU, bench/load.py at 64 clients):
the engine process went from 14-44 to ~195 faults per request, and a server with `--engine thread` at 16
clients from ~0 to ~100, so both keep glibc's own (the engine process is spawned: it does not inherit
this process's settings).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Bytes. Above MMAP_THRESHOLD a block is its own mapping (a full-size photo's decoded pixels): unmapped on
# free, as glibc does by default. glibc bounds M_MMAP_THRESHOLD at 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 16 << 20


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (bytes; see the module's docstring).

    Returns True if both were set; False where the C library is not glibc (nothing is changed: musl,
    macOS) or glibc refused a value. Called once at start-up by each HTTP process of a process engine."""
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
