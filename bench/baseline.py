"""Side-by-side benchmarks: this tree beside a reference commit, in one run, on one machine.

    with reference_tree("58bc13d") as ref:           # a temporary checkout of that commit
        cmd = tree_command(ROOT / "bench/offline_probe.py", "--model", checkpoint)   # this tree's script
        subprocess.run(cmd, env=tree_env(ref), cwd=ref)                             # the commit's code

The benchmark script is always this tree's; only the code it measures comes from the other tree, run in
a subprocess whose PYTHONPATH is that tree (and nothing else). So the measurement relies only on surfaces
that both trees share: the HTTP API, `python -m server.cli`, and `model.Blip2Engine`.

Also here: per-process CPU time from /proc (the engine process's, the HTTP processes'), the median of
repeated runs, and the table of this tree's figures beside the reference's with their ratio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resolve_commit(ref: str, repo: Path = ROOT) -> str:
    """The full hash of `ref` (a commit, branch, tag or `HEAD`) in `repo`; ValueError if git knows none."""
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise ValueError(f"--ref: no commit named {ref!r} in {repo}")
    return out.stdout.strip()


@contextlib.contextmanager
def reference_tree(ref: str, repo: Path = ROOT) -> Iterator[Path]:
    """A temporary checkout of commit `ref` (its tracked files, as `git archive` writes them), removed
    on exit. `git archive` rather than `git worktree add`: nothing is registered in the repository, so a
    run killed half-way leaves at most a directory under the system's temp folder, never a worktree."""
    commit = resolve_commit(ref, repo)
    tmp = Path(tempfile.mkdtemp(prefix=f"blipserve-ref-{commit[:8]}-"))
    try:
        archive = tmp / "tree.tar"
        subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit], cwd=repo, check=True)
        tree = tmp / "tree"
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
        archive.unlink()
        yield tree
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tree_env(tree: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `tree` first on PYTHONPATH and this tree off it (so `import model`
    / `server` is that tree's, never this one's), other entries kept (packages installed to a folder, as
    on the device machine), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return {**env, "PYTHONPATH": os.pathsep.join([str(tree), *kept]), **(extra or {})}


def tree_command(script: Path | str, *args: str) -> list[str]:
    """`python -P script args...`: -P keeps the script's own folder off sys.path, so a script of this
    tree imports the modules of whatever tree PYTHONPATH names."""
    return [sys.executable, "-P", str(script), *args]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (Linux /proc/<pid>/stat
    fields 14 and 15, utime and stime, in clock ticks). FileNotFoundError once it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (every process whose parent, /proc/<n>/stat field 4, is `pid`),
    oldest first. Scans /proc, so children started by any thread are found."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append((int(fields[19]), int(entry.name)))  # field 22: start time
    return [p for _, p in sorted(found)]


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    out = [pid]
    for child in children(pid):
        out += descendants(child)
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of `pids` and everything below them (processes gone meanwhile count 0)."""
    total = 0.0
    for pid in {p for root in pids for p in descendants(root)}:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += process_cpu(pid)
    return total


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_pids(server: int, info: dict, engine: str, dp: int) -> list[int]:
    """The engine processes of the server whose main process is `server`: the pids /v1/models lists
    (--dp > 1), else its oldest `dp` child processes other than multiprocessing's resource tracker (the
    engines start before any --api-workers process). None with --engine thread."""
    pids = [e["pid"] for e in info.get("engines", []) if e.get("pid")]
    if pids or engine == "thread":
        return pids
    return [c for c in children(server) if "resource_tracker" not in cmdline(c)][: max(dp, 1)]


def median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def ratio(ours: float, ref: float) -> float:
    """ours / ref (NaN where ref is 0 or NaN)."""
    return ours / ref if ref and ref == ref else float("nan")


def compare_table(
    rows: Sequence[tuple[str, float, float]], ours: str = "this tree", ref: str = "ref", digits: int = 2
) -> str:
    """One line per (name, our value, reference value): both, and ours / ref (`x` suffix)."""
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'':<{width}} {ours:>12} {ref:>12} {'ratio':>7}"]
    for name, a, b in rows:
        lines.append(f"{name:<{width}} {a:>12.{digits}f} {b:>12.{digits}f} {ratio(a, b):>6.2f}x")
    return "\n".join(lines)


def spread(values: Sequence[float]) -> str:
    """The runs of one figure, e.g. `212.3 / 198 / 205.1 (±3.5 %)`: half the range over the median."""
    mid = median(values)
    half = (max(values) - min(values)) / 2 / mid * 100 if mid == mid and mid else float("nan")
    return " / ".join(f"{v:.4g}" for v in values) + f" (±{half:.1f} %)"
