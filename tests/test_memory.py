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


# The served pattern in small: a worker thread (the image pool) allocates four 800 KiB buffers (float32
# pixels are 0.6 MB at 224 px) and fills them; the main thread (the event loop) frees them. One 1 MiB
# block freed first leaves glibc's own thresholds where a server's start-up can leave them (mmap 1 MiB,
# trim 2 MiB), so each round frees 3.2 MiB at the top of the worker's heap. Prints page faults per round.
PATTERN = """
import queue, resource, sys, threading
from server.memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    raise SystemExit("keep_freed_memory refused")
prime = bytearray(1 << 20)
del prime
jobs, done = queue.Queue(), queue.Queue()
def worker():
    while jobs.get():
        done.put([bytearray(800 * 1024) for _ in range(4)])
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


def faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
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
