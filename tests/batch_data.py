"""Test datasets for `blipserve batch`, written into a temporary folder, and what the model says of them."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from live import png_bytes

from model.data.image import decode_image
from model.decoding.generation import SamplingParams
from model.engine import Blip2Engine

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"
QUESTION = "what is in the picture?"


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def webdataset(folder: Path) -> dict[str, bytes | None]:
    """Two shards as img2dataset writes them: `{00000..00001}.tar`; returns key -> image bytes (None:
    a sample without an image; CORRUPT: an undecodable one)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, bytes | None]] = [
        {"000000": png_bytes(1), "000001": png_bytes(2), "000002": None, "000003": png_bytes(3)},
        {"000100": CORRUPT, "000101": png_bytes(4), "000102": png_bytes(1)},  # 000102: same image as 000000
    ]
    for n, shard in enumerate(samples):
        with tarfile.open(folder / f"{n:05d}.tar", "w") as tf:
            for key, image in shard.items():
                if image is not None:
                    add_member(tf, f"{key}.{'jpg' if image is CORRUPT else 'png'}", image)
                add_member(
                    tf, f"{key}.json", json.dumps({"key": key, "question": f"{QUESTION} {key}"}).encode()
                )
                add_member(tf, f"{key}.txt", b"a caption")
    return {k: v for shard in samples for k, v in shard.items()}


def parquet_bytes(path: Path) -> dict[str, bytes]:
    """img2dataset's parquet layout: `key` and `jpg` (image bytes) columns."""
    rows = {"a": png_bytes(5), "b": CORRUPT, "c": png_bytes(6)}
    pq.write_table(pa.table({"key": list(rows), "jpg": list(rows.values())}), path)
    return rows


def parquet_paths(path: Path) -> dict[str, bytes | None]:
    """A `file` column of paths relative to the parquet file, one of them missing."""
    images = {"p0.png": png_bytes(7), "p1.png": png_bytes(8)}
    for name, data in images.items():
        (path.parent / name).write_bytes(data)
    names = [*images, "missing.png"]
    pq.write_table(pa.table({"id": [f"id{i}" for i in range(3)], "file": names}), path)
    return {"id0": images["p0.png"], "id1": images["p1.png"], "id2": None}


def image_folder(folder: Path, count: int, corrupt: str | None = None) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {f"img{i:03d}.png": png_bytes(100 + i) for i in range(count)}
    if corrupt is not None:
        images[corrupt] = CORRUPT
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return images


def openai_file(path: Path, model: str) -> list[dict]:
    """Caption, VQA and chat lines; one with an undecodable image, one that is not JSON."""
    b64 = base64.b64encode(png_bytes(9)).decode()
    bad = base64.b64encode(CORRUPT).decode()
    chat = {
        "model": model,
        "max_tokens": 6,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                ],
            }
        ],
    }
    lines = [
        {
            "custom_id": "cap",
            "method": "POST",
            "url": "/caption",
            "body": {"image": b64, "max_new_tokens": 6},
        },
        {"custom_id": "vqa", "method": "POST", "url": "/vqa", "body": {"image": b64, "question": "what?"}},
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "bad", "method": "POST", "url": "/caption", "body": {"image": bad}},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines[:2]) + "{not json\n"
    text += "".join(json.dumps(line) + "\n" for line in lines[2:])
    path.write_text(text)
    return lines


def unbatchable_file(path: Path, model: str) -> None:
    """A caption line between lines asking for a stream (which a batch job refuses, as OpenAI's Batch
    API does): `/caption` with stream true, chat with stream true, chat with only stream_options."""
    image = base64.b64encode(png_bytes(9)).decode()
    chat = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        {"custom_id": "e", "method": "POST", "url": "/caption", "body": {"image": image, "stream": True}},
        {
            "custom_id": "ok",
            "method": "POST",
            "url": "/caption",
            "body": {"image": image, "max_new_tokens": 4},
        },
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {**chat, "stream": True}},
        {
            "custom_id": "o",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {**chat, "stream_options": {"include_usage": True}},
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def check_unbatchable(out: Path) -> None:
    """The output of `unbatchable_file`: every streaming line an error line naming its field."""
    by_id = {r["custom_id"]: r for r in read_rows(out)}
    assert list(by_id) == ["e", "ok", "c", "o"]
    assert by_id["ok"]["response"]["status_code"] == 200 and by_id["ok"]["error"] is None
    for key, field in (("e", "stream"), ("c", "stream"), ("o", "stream_options")):
        line = by_id[key]
        assert line["response"] is None, line
        assert line["error"]["code"] == "invalid_request"
        assert line["error"]["message"].startswith(f"body.{field}: not supported in a batch job"), line
    stats = json.loads(out.with_name(out.stem + ".stats.json").read_text())
    assert (stats["rows"], stats["errors"]) == (4, 3)


def expected(engine: Blip2Engine, images: dict[str, bytes], prompts: dict[str, str | None] | None = None,
             max_new_tokens: int = 8) -> dict[str, tuple[str, str]]:  # fmt: skip
    """key -> (text, finish_reason) from `Blip2Engine.generate` of the decodable images, all in one batch."""
    good = {}
    for key, data in images.items():
        try:
            good[key] = engine.image_processor.preprocess(decode_image(data))
        except (ValueError, TypeError):
            continue
    prompts = prompts or {}
    with torch.inference_mode():
        results = engine.generate(
            list(good.values()), [prompts.get(k) for k in good], SamplingParams(max_new_tokens=max_new_tokens)
        )
    return {k: (r.text, r.finish_reason) for k, r in zip(good, results, strict=True)}


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def corrupt_second_row_group(path: Path, first: int) -> None:
    """A parquet file whose footer is sound (it counts its rows) but whose second row group is not:
    `first` rows without an image (answered without the model), then 3 that cannot be read."""
    keys = [f"k{i}" for i in range(first + 3)]
    table = pa.table({"key": keys, "jpg": [b""] * first + [png_bytes(i) for i in range(3)]})
    pq.write_table(table, path, row_group_size=first, compression="none")
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))
