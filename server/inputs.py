"""Request bodies (JSON or multipart) -> validated params and raw image bytes; image decoding."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from model.data.image import ImageError, ImageProcessor, ImageTooLarge, decode_image

from .errors import ApiError, invalid


@dataclass
class Parsed:
    body: BaseModel  # the validated request model (params, prompt/question fields)
    images: list[bytes | str]  # raw image bytes, or an http(s) URL to fetch, in request order


def decode_base64(value: str, field: str) -> bytes:
    """base64 (standard or URL-safe) or a data: URL -> bytes."""
    data = value.strip()
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{field}: data URL must be base64-encoded")
    try:
        return base64.b64decode(
            data + "=" * (-len(data) % 4),
            altchars=b"-_" if "-" in data or "_" in data else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: not valid base64") from None


# Bytes that were not UTF-8, as `surrogateescape` decoding keeps them.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _has_bad_utf8(value: Any) -> bool:
    if isinstance(value, str):
        # Both checks run in C: this sees every request's base64 image, on the event loop.
        return not value.isascii() and _ESCAPED_BYTE.search(value) is not None
    if isinstance(value, list):
        return any(_has_bad_utf8(v) for v in value)
    return False


def _printable(key: str) -> str:
    return key.encode("utf-8", errors="replace").decode("utf-8")


def is_url(value: str) -> bool:
    """Anything shaped scheme://... is a URL (the fetcher then refuses schemes other than http(s))."""
    return re.match(r"\s*[a-zA-Z][a-zA-Z0-9+.-]{0,15}://", value) is not None


def _validate(model: type[BaseModel], raw: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc.errors()) from None


async def parse_body(request: Request, model: type[BaseModel]) -> Parsed:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            # surrogateescape keeps invalid UTF-8 bytes visible, so the field holding them can be named.
            raw = json.loads((await request.body()).decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError:
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "body: expected a JSON object")
        for key, value in raw.items():
            if _has_bad_utf8(key) or _has_bad_utf8(value):
                raise ApiError(422, f"{_printable(key)}: not valid UTF-8")
        body = _validate(model, raw)
        fields = (
            [("image", body.image)]
            if body.image is not None
            else [(f"images[{i}]", v) for i, v in enumerate(body.images or [])]
        )
        return Parsed(body, [v if is_url(v) else decode_base64(v, name) for name, v in fields])
    if ctype == "multipart/form-data":
        return await _parse_form(request, model)
    raise ApiError(
        415, f"unsupported content type {ctype or '(none)'!r}; use application/json or multipart/form-data"
    )


async def _parse_form(request: Request, model: type[BaseModel]) -> Parsed:
    try:
        form = await request.form()
    except Exception:
        raise ApiError(
            400, "malformed multipart/form-data body (send fields and a file part named 'image')"
        ) from None
    images: list[bytes] = []
    raw: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("image", "images"):
                raise ApiError(422, f"{key}: unexpected file part (files go in 'image')")
            images.append(await value.read())
        elif key in ("questions", "stop", "texts"):
            raw.setdefault(key, []).append(value)
        elif key in ("image", "images"):
            raise ApiError(422, f"{key}: must be a file part")
        else:
            raw[key] = value
    if not images:
        raise ApiError(422, "image: a file part named 'image' is required")
    # The model's image fields are for JSON; a placeholder keeps its 'exactly one' rule meaningful.
    raw["images" if len(images) > 1 else "image"] = ["file"] * len(images) if len(images) > 1 else "file"
    return Parsed(_validate(model, raw), images)


@dataclass
class Prepared:
    pixel_values: Any  # torch.Tensor [3, H, W] float32, or with `raw` [H, W, 3] uint8 (not normalised)
    key: str  # content hash of the raw bytes: the embedding cache key
    size: tuple[int, int] = (0, 0)  # (width, height) of the decoded image, before resizing


def prepare_image(
    data: bytes, processor: ImageProcessor, max_pixels: int, index: int, raw: bool = False
) -> Prepared:
    """Decode and preprocess one image (runs in a worker thread); `raw`: resized only, the engine
    normalises (`ImageProcessor.normalize`)."""
    where = f"image[{index}]" if index else "image"
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise ApiError(413 if isinstance(exc, ImageTooLarge) else 400, f"{where}: {exc}") from None
    try:
        pixels = processor.rgb(image) if raw else processor.preprocess(image)
    except Exception:
        raise ApiError(400, f"{where}: the image could not be converted to RGB pixels") from None
    return Prepared(pixels, hashlib.sha256(data).hexdigest(), image.size)
