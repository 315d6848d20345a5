"""The first hour: start-up mistakes are a line with exit status 2 (no traceback), help describes every
option with its default, and an engine that cannot load its checkpoint ends the server cleanly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from live import ROOT, free_port
from safetensors.torch import save_file


def blipserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "/nonexistent"], "--model /nonexistent: no such directory"),
        (["--model", "./nonexistent"], "--model ./nonexistent: no such directory"),
        (["--model", str(ROOT / "configs")], "not a checkpoint, it has no config.json"),
        (
            ["--dtype", "fp16"],
            "invalid choice: 'fp16' (choose from 'auto', 'float16', 'bfloat16', 'float32')",
        ),
        (["--device", "gpu"], "--device gpu: expected cpu, cuda, cuda:N or auto"),
        (["--config", "nope"], "no config file 'nope'; presets: ["),
        (["--max-queue", "many"], "argument --max-queue: invalid int value: 'many'"),
    ],
)
def test_startup_mistakes_are_one_clear_line_and_exit_2(args, words):
    out = blipserve(*args)
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr


def test_settings_from_the_environment_are_checked_the_same_way():
    env = {"BLIPSERVE_DTYPE": "fp16"}
    cmd = [sys.executable, "-m", "server.cli"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**_env(), **env})
    assert (
        out.returncode == 2 and "--dtype fp16: expected one of auto, float16, bfloat16, float32" in out.stderr
    )


def _env() -> dict:

    return dict(os.environ)


def test_help_lists_the_commands_and_the_client_options_with_their_defaults():
    text = blipserve("--help").stdout
    assert "blipserve caption IMAGE..." in text and "blipserve vqa IMAGE..." in text
    assert "--cuda-graphs, --no-cuda-graphs" in text and "BLIPSERVE_" in text
    for command in ("caption", "vqa"):
        sub = blipserve(command, "--help").stdout
        options = re.split(r"\n  (?=-)", sub.split("\noptions:", 1)[1])
        for flag in ("--url", "--concurrency", "--max-new-tokens"):
            entry = next(e for e in options if e.split() and e.split()[0] == flag)
            assert "default" in entry and len(entry.split()) > 4, (command, flag, entry)
        assert "Exit status 1 if any image failed" in " ".join(sub.split())


@pytest.mark.slow  # a server started and its engine process failing: ~5 s
def test_a_checkpoint_the_engine_cannot_load_ends_the_server_with_one_error_line(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints("pre_ln")[0], broken)
    save_file({}, str(broken / "model.safetensors"))  # a valid file without a single tensor
    out = blipserve("--model", str(broken), "--port", str(free_port()), "--device", "cpu")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "cannot load" in out.stderr and "missing" in out.stderr
    assert "Traceback" not in out.stderr
