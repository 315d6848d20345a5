"""bench/baseline.py: the CPU time read from /proc, the reference checkout, the ratio table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.baseline import (
    ROOT,
    compare_table,
    descendants,
    process_cpu,
    reference_tree,
    resolve_commit,
    tree_cpu,
)

# Burns argv[1] seconds of its own CPU time, starts itself for the further values, prints
# "pid cpu;pid cpu..." (its own pid and CPU seconds last) once every process below it has, then sleeps
# (no CPU) until its stdin closes.
BURN = """
import os, subprocess, sys, time
cpu, rest = float(sys.argv[1]), sys.argv[2:]
start = time.process_time()
while time.process_time() - start < cpu:
    pass
below, child = "", None
if rest:
    child = subprocess.Popen([sys.executable, __file__, *rest], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    below = child.stdout.readline().strip() + ";"
print(f"{below}{os.getpid()} {time.process_time()}", flush=True)
sys.stdin.read()
if child is not None:
    child.stdin.close()
    child.wait()
"""


def burn_tree(tmp: Path, *cpu: float) -> tuple[subprocess.Popen, dict[int, float]]:
    """A chain of processes, the i-th burning cpu[i] s; each one's pid and CPU seconds as it reports."""
    script = tmp / "burn.py"
    script.write_text(BURN)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, cpu)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline().strip()
    reported = {int(p): float(c) for p, c in (part.split() for part in line.split(";"))}
    return proc, reported


def test_cpu_of_a_process_and_its_tree_match_what_they_report(tmp_path):
    proc, reported = burn_tree(tmp_path, 0.3, 0.4)
    try:
        assert len(reported) == 2 and proc.pid in reported
        tick = 0.03  # /proc counts whole clock ticks (10 ms, utime and stime each rounded down)
        assert abs(process_cpu(proc.pid) - reported[proc.pid]) <= tick
        assert sorted(descendants(proc.pid)) == sorted(reported)
        assert abs(tree_cpu([proc.pid]) - sum(reported.values())) <= 2 * tick
        assert reported[proc.pid] >= 0.3 and sum(reported.values()) >= 0.7
    finally:
        proc.stdin.close()
        proc.wait(30)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_reference_tree_is_the_commits_tracked_files_and_goes_away():
    head = resolve_commit("HEAD")
    assert len(head) == 40
    with reference_tree("HEAD") as tree:
        listed = subprocess.run(["git", "ls-tree", "--name-only", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()  # fmt: skip
        assert sorted(p.name for p in tree.iterdir()) == sorted(listed)  # no .venv, nothing untracked
        committed = subprocess.run(["git", "show", "HEAD:pyproject.toml"], cwd=ROOT, capture_output=True,
                                   check=True).stdout  # fmt: skip
        assert (tree / "pyproject.toml").read_bytes() == committed
    assert not tree.exists() and not tree.parent.exists()
    with pytest.raises(ValueError, match="no-such-commit"):
        resolve_commit("no-such-commit")


def test_compare_table_shows_both_values_and_their_ratio():
    table = compare_table([("req/s", 120.0, 100.0), ("engine CPU ms/req", 3.0, 6.0), ("x", 1.0, 0.0)])
    lines = table.splitlines()
    assert lines[0].split() == ["this", "tree", "ref", "ratio"]
    assert lines[1].split() == ["req/s", "120.00", "100.00", "1.20x"]
    assert lines[2].split()[-3:] == ["3.00", "6.00", "0.50x"]
    assert lines[3].split()[-1] == "nanx"  # no reference value: no ratio
    assert len({len(line) for line in lines}) == 1  # columns line up


# Run with bench/model_cpu first on the path: `encode_images` in two threads at once, beside a busy loop
# outside any model call; prints the thread CPU spent inside the model and what the probe wrote.
MODEL_CPU = """
import os, sys, threading, time
import torch
import sitecustomize, chained_marker  # the probe, and the sitecustomize it shadows (which it still ran)
from model import Blip2Engine
engine = Blip2Engine.from_pretrained(sys.argv[1])
side = engine.image_processor.height
pixels = torch.randn(4, 3, side, side)
type(engine.model).encode_images.__wrapped__  # wrapped: the probe is on
spent = []
def encode():
    start = time.thread_time()
    with torch.inference_mode():
        for _ in range(20):
            engine.model.encode_images(pixels)
    spent.append(time.thread_time() - start)
other = threading.Thread(target=encode)
other.start()
encode()
other.join()
outside = time.thread_time()
while time.thread_time() - outside < 0.3:  # CPU the probe must not count
    pass
time.sleep(0.3)  # its writer's next turn
print(sum(spent), float(open(os.path.join(os.environ["BLIPSERVE_MODEL_CPU_DIR"], str(os.getpid()))).read()))
"""


@pytest.mark.slow  # a subprocess that loads torch and a model: ~7 s
def test_model_cpu_probe_counts_the_models_thread_time_and_nothing_else(checkpoints, tmp_path):
    root, _ = checkpoints("pre_ln")
    shadowed = tmp_path / "shadowed"
    shadowed.mkdir()
    (shadowed / "sitecustomize.py").write_text(
        "import sys, types\nsys.modules['chained_marker'] = types.ModuleType('m')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench' / 'model_cpu'}:{ROOT}:{shadowed}",
           "BLIPSERVE_MODEL_CPU_DIR": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", MODEL_CPU, str(root)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    inside, recorded = map(float, out.stdout.split())
    assert inside > 0.04
    # Both threads' calls counted (one of them alone would be about half), the busy loop outside not.
    assert inside * 0.9 - 0.01 <= recorded <= inside + 0.02


def test_each_load_pass_sends_images_of_its_own():
    from bench.load import images

    first, again, other = images(8, seed=1), images(8, seed=1), images(8, seed=2)
    assert first == again and len(set(first)) == 8  # a pass's images are distinct, and reproducible
    assert not set(first) & set(other)  # no image of one pass in another: no cached embeddings reused


def test_tree_env_puts_the_tree_first_and_this_tree_off_the_path(monkeypatch, tmp_path):
    from bench.baseline import tree_env

    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:/tmp/site:{ROOT}/")
    env = tree_env(tmp_path, {"X": "1"})
    assert env["PYTHONPATH"].split(":") == [str(tmp_path), "/tmp/site"]  # wheels installed there still found
    assert env["X"] == "1"
