"""A small client for blipserve: `BlipClient` (httpx) and the `blipserve caption|vqa` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import httpx

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


class BlipClientError(Exception):
    def __init__(self, status: int, body: dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status} {error.get('type', '')}: {error.get('message', body)}")
        self.status = status
        self.body = body


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the images inside them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


class BlipClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> BlipClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.aclose()

    async def _post(self, path: str, image: bytes | Path, fields: dict[str, Any]) -> dict:
        data = image.read_bytes() if isinstance(image, Path) else image
        form = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items() if v is not None
        }
        r = await self.http.post(path, files={"image": ("image", data)}, data=form)
        body = r.json()
        if r.status_code != 200:
            raise BlipClientError(r.status_code, body)
        return body

    async def caption(self, image: bytes | Path, prompt: str | None = None, **params: Any) -> dict:
        return await self._post("/caption", image, {"prompt": prompt, **params})

    async def vqa(self, image: bytes | Path, question: str, **params: Any) -> dict:
        return await self._post("/vqa", image, {"question": question, **params})

    async def run_many(
        self,
        files: list[Path],
        question: str | None = None,
        concurrency: int = 8,
        progress: Callable[[int, int, Path, dict | Exception], None] | None = None,
        **params: Any,
    ) -> list[dict | Exception]:
        """Caption (or ask `question` about) each file, `concurrency` (>= 1) at a time; results in file
        order, an exception in place of a failed file's reply. Raises ValueError if concurrency < 1."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        gate = asyncio.Semaphore(concurrency)
        results: list[dict | Exception] = [None] * len(files)  # type: ignore[list-item]
        done = 0

        async def one(i: int, f: Path) -> None:
            nonlocal done
            async with gate:
                try:
                    results[i] = await (
                        self.vqa(f, question, **params) if question else self.caption(f, **params)
                    )
                except httpx.TransportError as exc:  # the connection, not the image: name the server
                    results[i] = ConnectionError(f"cannot reach {self.http.base_url}: {exc}")
                except (BlipClientError, httpx.HTTPError, OSError) as exc:
                    results[i] = exc
            done += 1
            if progress is not None:
                progress(done, len(files), f, results[i])

        await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))
        return results


def _print_progress(done: int, total: int, path: Path, result: dict | Exception) -> None:
    status = "error" if isinstance(result, Exception) else "ok"
    print(f"[{done}/{total}] {status} {path}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """The mistake in a line, not argparse's whole usage block (exit status 2)."""
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def _at_least_one(value: str) -> int:
    """argparse type: a whole number >= 1 (a usage error otherwise, exit status 2)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


def _http_url(value: str) -> str:
    """argparse type: an http:// or https:// address."""
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT or https://HOST:PORT, got {value!r}")
    return value.rstrip("/")


EXIT_STATUS = """exit status:
  0  every image was answered
  1  one image or more failed (its line on stdout carries "error")
  2  nothing was sent: a usage mistake, no image found, or the server cannot be reached at --url"""


def _client_parser(command: str) -> argparse.ArgumentParser:
    what = "Answer a question about" if command == "vqa" else "Caption"
    example = '--question "how many cats are there?" ' if command == "vqa" else ""
    ap = _Parser(
        prog=f"blipserve {command}",
        description=textwrap.fill(
            f"{what} images with a running blipserve server. One JSON line per image on stdout "
            '({"image", "text", "finish_reason"}, or {"image", "error"}; non-ASCII and control characters '
            "escaped), progress on stderr. Exit status 1 if any image failed.",
            width=min(100, shutil.get_terminal_size().columns - 2),
        ),
        epilog=f"example:\n  blipserve {command} photos/ cat.jpg {example}--url http://gpu-host:8000\n\n"
        + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, or folders searched recursively for "
        + ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        + " files",
    )
    if command == "vqa":
        ap.add_argument(
            "--question", required=True, metavar="TEXT", help="the question, asked about every image"
        )
    else:
        ap.add_argument(
            "--prompt", metavar="TEXT", help="text the caption continues (default: none, a plain caption)"
        )
    ap.add_argument(
        "--url", type=_http_url, default="http://127.0.0.1:8000", help="the server (default: %(default)s)"
    )
    ap.add_argument(
        "--api-key", metavar="KEY", help="the server's API key, if it has one (sent as a Bearer token)"
    )
    ap.add_argument(
        "--concurrency",
        type=_at_least_one,
        default=8,
        metavar="N",
        help="requests in flight at once, at least 1 (default: %(default)s)",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=_at_least_one,
        metavar="N",
        help="the longest answer, in tokens (default: the server's --default-max-new-tokens)",
    )
    ap.add_argument(
        "--num-beams",
        type=_at_least_one,
        metavar="N",
        help="beam search width; 1 is greedy (default: the server's, or the preset's)",
    )
    return ap


def _reachable(url: str, api_key: str | None) -> str | None:
    """None if `url` answers HTTP at all (any status); otherwise why not, in words."""
    try:
        httpx.get(
            url + "/health", timeout=10, headers={"authorization": f"Bearer {api_key}"} if api_key else {}
        )
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__
    return None


def run_client(command: str, argv: list[str]) -> int:
    """`blipserve caption|vqa IMAGE... [options]`: the exit status (see EXIT_STATUS)."""
    ap = _client_parser(command)
    args = ap.parse_args(argv)
    missing = [p for p in args.images if not Path(p).exists()]
    if missing:
        ap.error(f"no such file or folder: {', '.join(missing)}")
    files = image_files(args.images)
    if not files:
        ap.error(
            f"no images found in {', '.join(args.images)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    reason = _reachable(args.url, args.api_key)
    if reason is not None:
        ap.exit(2, f"{ap.prog}: error: cannot reach the server at {args.url}: {reason}\n")
    params = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if command == "caption":
        params["prompt"] = args.prompt

    async def go() -> list[dict | Exception]:
        async with BlipClient(args.url, args.api_key) as client:
            question = getattr(args, "question", None)
            return await client.run_many(files, question, args.concurrency, _print_progress, **params)

    results = asyncio.run(go())
    failed = 0
    for path, result in zip(files, results, strict=True):
        if isinstance(result, Exception):
            failed += 1
            print(json.dumps({"image": str(path), "error": str(result)}))
        else:
            text = result.get("caption", result.get("answer"))
            print(
                json.dumps({"image": str(path), "text": text, "finish_reason": result.get("finish_reason")})
            )
    return 1 if failed else 0
