"""The HTTP process's allocator settings (server/memory.py): buffers that a worker thread allocates and
the event loop's thread frees stay for the next request instead of being handed back to the kernel and
faulted in again (the ~180 page faults per /caption request that bench/load.py showed at 16 clients)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
from live import ROOT


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


# The served pattern in small: a worker thread (the image pool) allocates `count` buffers of `kib` KiB
# (float32 pixels are 0.6 MB at 224 px; a decoded 1080p photo 6 MB) and fills them; the main thread (the
# event loop) frees them. One 1 MiB block freed first leaves glibc's own thresholds where a server's
# start-up can leave them (mmap 1 MiB, trim 2 MiB). Prints page faults per round.
PATTERN = """
import queue, resource, sys, threading
from server.memory import keep_freed_memory
mode, count, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "keep" and not keep_freed_memory():
    raise SystemExit("keep_freed_memory refused")
if mode == "small" and not keep_freed_memory(4 << 20, 16 << 20):
    raise SystemExit("keep_freed_memory refused")
prime = bytearray(1 << 20)
del prime
jobs, done = queue.Queue(), queue.Queue()
def worker():
    while jobs.get():
        done.put([bytearray(kib * 1024) for _ in range(count)])
thread = threading.Thread(target=worker)
thread.start()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rounds(n):
    for _ in range(n):
        jobs.put(1)
        buffers = done.get()
        del buffers
rounds(3)
before = faults()
rounds(40)
print((faults() - before) / 40)
jobs.put(0)
thread.join()
"""


def faults_per_round(mode: str, count: int = 4, kib: int = 800, env: dict | None = None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode, str(count), str(kib)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")
def test_freed_image_buffers_are_not_faulted_in_again() -> None:
    # Without the settings the 3.2 MiB are trimmed every round and faulted in again (200 pages a buffer).
    assert faults_per_round("default") > 400
    # With them the worker reuses its heap: no page is faulted in again.
    assert faults_per_round("keep") < 20


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")
def test_a_photo_sized_buffer_is_reused_too() -> None:
    # A decoded 1080p photo (6.2 MB): glibc's own rule reuses it after the first free, and so must the
    # fixed thresholds (an mmap threshold of 4 MiB mapped and unmapped it every request: ~1,500 faults).
    assert faults_per_round("small", count=1, kib=6 * 1024) > 1000
    assert faults_per_round("keep", count=1, kib=6 * 1024) < 20


def test_bad_thresholds_are_refused_and_an_operators_setting_is_kept() -> None:
    from server.memory import keep_freed_memory

    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(64 << 20, 1 << 20)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(1 << 20, -5)
    # An operator's thresholds (read by glibc at start-up) stay: the call changes nothing and says so.
    script = "from server.memory import keep_freed_memory; print(keep_freed_memory())"
    for env in ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, {}):  # fmt: skip
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={"PYTHONPATH": str(ROOT), **env}, check=True)  # fmt: skip
        assert out.stdout.strip() == str(bool(not env and _glibc())), env


def test_keep_freed_memory_says_whether_it_applied() -> None:
    script = "from server.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == str(_glibc())
