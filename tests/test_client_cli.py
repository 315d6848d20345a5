"""`blipserve caption|vqa`: usage mistakes are one line with exit status 2 (never a hang or a traceback),
no image or no server is said once, naming the folder or the URL, and `help` describes every option."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from live import ROOT, free_port, png_bytes

from server.client import BlipClient


def blipserve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess, words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert words in out.stderr.splitlines()[0], out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(i))
    return tmp_path


@pytest.mark.parametrize("flag", ["--concurrency", "--max-new-tokens", "--num-beams"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_count_below_one_is_a_usage_error_not_a_hang(folder, flag, value):
    # --concurrency 0 used to wait forever on an empty semaphore, -1 to raise out of asyncio.
    out = blipserve("caption", str(folder), flag, value, "--url", f"http://127.0.0.1:{free_port()}")
    _one_error_line(out, f"argument {flag}: expected a whole number of at least 1, got '{value}'")


def test_an_empty_folder_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    out = blipserve("vqa", str(tmp_path), "--question", "what is it?")
    _one_error_line(out, f"blipserve vqa: error: no images found in {tmp_path}")


def test_a_missing_path_is_named(folder):
    out = blipserve("caption", str(folder), str(folder / "nope.png"))
    _one_error_line(out, f"no such file or folder: {folder / 'nope.png'}")


def test_an_unreachable_server_is_one_error_naming_the_url(folder):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = blipserve("caption", str(folder), "--url", url)
    _one_error_line(out, f"blipserve caption: error: cannot reach the server at {url}")
    _one_error_line(blipserve("caption", str(folder), "--url", "localhost:8000"), "argument --url: expected")


def test_the_python_client_names_the_server_it_cannot_reach_and_refuses_no_concurrency(folder):
    url = f"http://127.0.0.1:{free_port()}"

    async def go(concurrency: int) -> list:
        async with BlipClient(url) as client:
            return await client.run_many(sorted(folder.iterdir()), concurrency=concurrency)

    results = asyncio.run(go(2))
    assert len(results) == 3 and all(isinstance(r, ConnectionError) for r in results)
    assert all(f"cannot reach {url}" in str(r) for r in results)
    with pytest.raises(ValueError, match="concurrency must be at least 1, got 0"):
        asyncio.run(go(0))


def test_help_is_a_command():
    main = blipserve("help")
    assert (
        main.returncode == 0 and "blipserve caption IMAGE..." in main.stdout and "--max-queue" in main.stdout
    )
    for command in ("caption", "vqa", "batch"):  # batch: the main help before
        sub = blipserve("help", command)
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: blipserve {command}"), sub.stderr


@pytest.mark.parametrize("command", ["caption", "vqa"])
def test_client_help_describes_every_option(command):
    text = blipserve(command, "--help").stdout
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = {e.split()[0].rstrip(",") for e in entries}
    expected = {"-h", "--url", "--api-key", "--concurrency", "--max-new-tokens", "--num-beams"}
    assert flags == expected | ({"--question"} if command == "vqa" else {"--prompt"})
    for entry in entries:
        words = entry.split()
        # "--flag METAVAR  what it is": a sentence after the flag and its metavar, not argparse's None.
        described = words[2:] if len(words) > 1 and words[1].isupper() else words[1:]
        assert len(described) >= 4, entry
        assert "None" not in entry, entry
    assert "exit status:" in text and "2  nothing was sent" in text
