"""A small client for blipserve: `BlipClient` (httpx) and the `blipserve caption|vqa` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


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
        """Caption (or ask `question` about) each file, `concurrency` at a time; results in file order."""
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


def run_client(command: str, argv: list[str]) -> int:
    what = "answer a question about" if command == "vqa" else "caption"
    ap = argparse.ArgumentParser(
        prog=f"blipserve {command}",
        description=f"{what.capitalize()} images with a running blipserve server. One JSON line per image "
        'on stdout ({"image", "text", "finish_reason"}, or {"image", "error"}; non-ASCII and control '
        "characters escaped), progress on stderr. Exit status 1 if any image failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("images", nargs="+", help="image files, or folders of them (searched recursively)")
    if command == "vqa":
        ap.add_argument("--question", required=True, help="the question, asked about every image")
    else:
        ap.add_argument("--prompt", default=None, help="text for the caption to continue")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    ap.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length (none: the server's default)"
    )
    ap.add_argument(
        "--num-beams", type=int, default=None, help="beam search width (none: the server's default)"
    )
    args = ap.parse_args(argv)
    files = image_files(args.images)
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
