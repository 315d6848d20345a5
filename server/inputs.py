"""Request bodies (JSON or multipart) -> validated params and raw image bytes; image decoding."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from model.data.image import ImageError, ImageProcessor, ImageTooLarge, decode_image

from .errors import ApiError, Names, invalid, named
from .schemas import VQARequest


@dataclass
class Parsed:
    body: BaseModel  # the validated request model (params, prompt/question fields)
    images: list[bytes | str]  # raw image bytes, or an http(s) URL to fetch, in request order
    image_fields: list[str] = field(default_factory=list)  # each image's field as sent ("images[1]")
    names: dict[str, str] = field(default_factory=dict)  # the body's fields as sent, where they differ


def decode_base64(value: str, field: str) -> bytes:
    """base64 (standard or URL-safe) or a data: URL -> bytes."""
    data = value.strip()
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{field}: data URL must be base64-encoded", param=field)
    try:
        return base64.b64decode(
            data + "=" * (-len(data) % 4),
            altchars=b"-_" if "-" in data or "_" in data else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: not valid base64", param=field) from None


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


def _validate(model: type[BaseModel], raw: dict[str, Any], names: Names | None = None) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc.errors(), names=names) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: a key given twice is an error (json.loads would keep the last silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ApiError(422, f"{_printable(key)}: given more than once; send it once", param=key)
        seen[key] = value
    return seen


def load_json(data: bytes, escape: bool = True) -> Any:
    """A JSON body -> its value; 400 when it is not JSON, 422 for an object with a repeated key.

    `escape`: invalid UTF-8 bytes are kept (surrogateescape) for the caller to find, so that the field
    holding them can be named (`_has_bad_utf8`); else they make the body invalid."""
    try:
        text = data.decode("utf-8", errors="surrogateescape" if escape else "strict")
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, "body is not valid JSON") from None
    except RecursionError:  # [[[[...]]]]: the decoder recurses once per level
        raise ApiError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ApiError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


MAX_JSON_DEPTH = 32  # no request of ours nests deeper than a few levels


def _depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep lists and objects nest in a decoded JSON value (0 for a scalar; counted level by level,
    no recursion, stopping past `limit`)."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [x for x in level if isinstance(x, dict | list)]
        if not containers:
            break
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return depth


async def parse_body(request: Request, model: type[BaseModel]) -> Parsed:
    """A request's JSON or multipart body -> the validated `model`, its images, and how it named them."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = load_json(await request.body())
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
        images = [v if is_url(v) else decode_base64(v, name) for name, v in fields]
        return Parsed(body, images, [name for name, _ in fields])
    if ctype == "multipart/form-data":
        return await _parse_form(request, model)
    raise ApiError(
        415, f"unsupported content type {ctype or '(none)'!r}; use application/json or multipart/form-data"
    )


def _list_fields(model: type[BaseModel]) -> set[str]:
    """The model's fields that take a list (a multipart form gives them as repeated fields)."""

    def is_list(annotation: Any) -> bool:
        return get_origin(annotation) is list or any(is_list(a) for a in get_args(annotation))

    return {name for name, info in model.model_fields.items() if is_list(info.annotation)}


async def _parse_form(request: Request, model: type[BaseModel]) -> Parsed:
    """A multipart body: file parts are the images; a list field may repeat (`stop`, `texts`), a
    field whose plural is a list takes several values by repeating (`question` -> `questions`); any
    other field repeated is a 422 (it would otherwise keep one of the values silently)."""
    try:
        form = await request.form()
    except Exception:
        raise ApiError(
            400, "malformed multipart/form-data body (send fields and a file part named 'image')"
        ) from None
    files: list[tuple[str, UploadFile]] = []
    values: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("image", "images"):
                raise ApiError(422, f"{key}: unexpected file part (files go in 'image')", param=key)
            files.append((key, value))
        elif key in ("image", "images"):
            raise ApiError(422, f"{key}: must be a file part", param=key)
        else:
            values.setdefault(key, []).append(value)
    if not files and not getattr(model, "image_optional", False):
        raise ApiError(422, "image: a file part named 'image' is required", param="image")
    raw, names = _form_fields(model, values)
    # The model's image fields are for JSON; a placeholder keeps its 'exactly one' rule meaningful.
    if not files:
        image_fields = []
    elif len(files) > 1:
        raw["images"], names["images"] = ["file"] * len(files), files[0][0]
        image_fields = [f"{key}[{i}]" for i, (key, _) in enumerate(files)]
    else:
        raw["image"], image_fields = "file", [files[0][0]]
    images = [await part.read() for _, part in files]
    return Parsed(_validate(model, raw, names), images, image_fields, names)


def _form_fields(
    model: type[BaseModel], values: dict[str, list[str]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Form fields -> the model's raw input, and {model field: the form field it came from}."""
    lists = _list_fields(model)
    raw: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, given in values.items():
        if key in lists:
            raw[key] = given
        elif len(given) == 1 or key not in model.model_fields:
            raw[key] = given[-1] if len(given) == 1 else given  # an unknown field: validation names it
        elif key + "s" in lists and key + "s" not in values:
            raw[key + "s"], names[key + "s"] = given, key
        else:
            raise ApiError(
                422, f"{key}: given {len(given)} times; it takes one value (send it once)", param=key
            )
    return raw, names


@dataclass
class Prepared:
    pixel_values: Any  # torch.Tensor [3, H, W] float32, or with `raw` [H, W, 3] uint8 (not normalised)
    key: str  # content hash of the raw bytes: the embedding cache key
    size: tuple[int, int] = (0, 0)  # (width, height) of the decoded image, before resizing


def prepare_image(
    data: bytes, processor: ImageProcessor, max_pixels: int, where: str = "image", raw: bool = False
) -> Prepared:
    """Decode and preprocess one image (runs in a worker thread); `where`: its field as the user sent it
    (errors name it); `raw`: resized only, the engine normalises (`ImageProcessor.normalize`)."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        status = 413 if isinstance(exc, ImageTooLarge) else 400
        raise ApiError(status, f"{where}: {exc}", param=where) from None
    try:
        pixels = processor.rgb(image) if raw else processor.preprocess(image)
    except Exception:
        raise ApiError(400, f"{where}: the image could not be converted to RGB pixels", param=where) from None
    return Prepared(pixels, hashlib.sha256(data).hexdigest(), image.size)


def carries_template(question: str, template: str) -> bool:
    """Whether a question is a whole prompt in the template's shape already: it starts with the
    template's text before `{question}` and ends with the text after it, each compared without case and
    surrounding spaces ("Question: what is it? Answer:", or "... Short answer:", for the template
    "Question: {question} Answer:"). A template that is the bare question never matches."""
    lead, _, tail = (part.strip().lower() for part in template.partition("{question}"))
    text = question.strip().lower()
    if not (lead or tail) or len(text) < len(lead) + len(tail):
        return False
    return text.startswith(lead) and text.endswith(tail)


def vqa_prompt(question: str, template: str) -> str:
    """The prompt for a question: put into the VQA template, unless it carries the template already
    (`carries_template`: then it is the prompt as it stands, the template is not added twice)."""
    if carries_template(question, template):
        return question.strip()
    return template.format(question=question.strip())


def vqa_prompts(body: VQARequest, template: str, names: Names | None = None) -> list[tuple[str, str]]:
    """(the field as sent, its prompt) per question of a /vqa body: `prompt` as it stands (the raw form),
    each question through `vqa_prompt`."""
    if body.prompt is not None:
        return [("prompt", body.prompt)]
    if body.question is not None:
        return [("question", vqa_prompt(body.question, template))]
    many = named("questions", names)
    return [(f"{many}[{i}]", vqa_prompt(q, template)) for i, q in enumerate(body.questions or [])]
