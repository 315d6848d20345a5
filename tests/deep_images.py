"""Test helpers: image files of more than 8 bits per sample, written byte by byte (PIL writes only a few
of them), each with the 8-bit picture it stands for."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png(samples: np.ndarray, key: tuple[int, ...] | None = None) -> bytes:
    """[h, w] or [h, w, c] uint16 -> a 16-bit PNG (grey, grey+alpha, RGB, RGBA by c), `key` as tRNS."""
    samples = samples[..., None] if samples.ndim == 2 else samples
    h, w, c = samples.shape
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
    if key is not None:
        out += chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
    return out + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiff(
    samples: np.ndarray, bits: int = 16, signed: bool = False, big: bool = False, orientation: int = 1
) -> bytes:
    """[h, w] or [h, w, c] integers -> an uncompressed TIFF of `bits` per sample (12: packed, grey
    only), RGB / RGBA (unassociated alpha) for c = 3 / 4."""
    samples = samples[..., None] if samples.ndim == 2 else samples
    h, w, c = samples.shape
    e = ">" if big else "<"
    if bits == 12:
        data = b""
        for row in samples[..., 0]:  # each row starts on a byte
            text = "".join(format(int(v), "012b") for v in row)
            text += "0" * (-len(text) % 8)
            data += int(text, 2).to_bytes(len(text) // 8, "big")
    else:
        data = samples.astype(f"{e}{'i' if signed else 'u'}{bits // 8}").tobytes()
    tags = {256: w, 257: h, 258: [bits] * c, 259: 1, 262: 2 if c >= 3 else 1, 273: 0, 274: orientation}
    tags |= {277: c, 278: h, 279: len(data), 284: 1, 339: [2 if signed else 1] * c}
    if c == 4:
        tags[338] = 2
    extra_at = 8 + 2 + 12 * len(tags) + 4  # after the header and the one IFD
    entries, extra = _entries(tags, e, extra_at)
    tags[273] = extra_at + len(extra)  # the pixel data comes last
    entries, extra = _entries(tags, e, extra_at)
    head = (b"MM" if big else b"II") + struct.pack(f"{e}HI", 42, 8)
    return head + struct.pack(f"{e}H", len(tags)) + entries + b"\x00" * 4 + extra + data


def _entries(tags: dict[int, int | list[int]], e: str, extra_at: int) -> tuple[bytes, bytes]:
    """A TIFF IFD's 12-byte entries, and the values too long to fit in one (stored at `extra_at`)."""
    entries, extra = b"", b""
    for tag, value in sorted(tags.items()):
        values = value if isinstance(value, list) else [value]
        kind = 4 if tag in (273, 279) else 3  # LONG, else SHORT
        packed = struct.pack(f"{e}{len(values)}{'I' if kind == 4 else 'H'}", *values)
        if len(packed) > 4:
            field = struct.pack(f"{e}I", extra_at + len(extra))
            extra += packed
        else:
            field = packed.ljust(4, b"\x00")
        entries += struct.pack(f"{e}HHI", tag, kind, len(values)) + field
    return entries, extra


def saved(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(seed: int, channels: int, size: tuple[int, int] = (37, 23)) -> np.ndarray:
    """A random 8-bit picture [h, w, channels] uint8."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)


def deepen(eight: np.ndarray, bits: int, seed: int = 1) -> np.ndarray:
    """8-bit samples -> `bits`-bit samples whose high 8 bits are the 8-bit ones (random low bits, so that
    only the high byte can give the 8-bit picture back)."""
    low = np.random.default_rng(seed).integers(0, 1 << (bits - 8), eight.shape)
    return (eight.astype(np.int64) << (bits - 8)) | low


def deep_cases(seed: int = 0) -> dict[str, tuple[bytes, bytes]]:
    """name -> (high-depth file, the 8-bit PNG of the same picture)."""
    grey, rgb, rgba, la = picture(seed, 1)[..., 0], picture(seed, 3), picture(seed, 4), picture(seed, 2)
    g16, rgb16, rgba16, la16 = (deepen(a, 16) for a in (grey, rgb, rgba, la))
    keyed_grey = grey.copy()
    keyed_grey[:5, :9] = 77  # a block of the colour key, and stray pixels of its high byte elsewhere
    keyed_rgb = rgb.copy()
    keyed_rgb[:5, :9] = (10, 200, 30)
    eight = {
        "L": saved(Image.fromarray(grey)),
        "RGB": saved(Image.fromarray(rgb)),
        "RGBA": saved(Image.fromarray(rgba)),
        "LA": saved(Image.fromarray(la, "LA")),
    }
    return {
        "png-grey16": (png(g16), eight["L"]),
        "png-grey16-key": (
            png(deepen(keyed_grey, 16), key=(77 << 8 | 5,)),
            saved(Image.fromarray(keyed_grey), transparency=77),
        ),
        "png-grey16-alpha": (png(la16), eight["LA"]),
        "png-rgb16": (png(rgb16), eight["RGB"]),
        "png-rgb16-key": (
            png(deepen(keyed_rgb, 16), key=(10 << 8 | 3, 200 << 8, 30 << 8 | 255)),
            saved(Image.fromarray(keyed_rgb), transparency=(10, 200, 30)),
        ),
        "png-rgba16": (png(rgba16), eight["RGBA"]),
        "tiff-grey16": (tiff(g16), eight["L"]),
        "tiff-grey16-big-endian": (tiff(g16, big=True), eight["L"]),
        "tiff-grey12": (tiff(deepen(grey, 12), bits=12), eight["L"]),
        "tiff-grey16-signed": (tiff(deepen(grey, 15), signed=True), eight["L"]),
        "tiff-grey32": (tiff(deepen(grey, 32), bits=32), eight["L"]),
        "tiff-grey32-signed": (tiff(deepen(grey, 31), bits=32, signed=True), eight["L"]),
        "tiff-float": (saved(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"), eight["L"]),
        "tiff-rgb16": (tiff(rgb16), eight["RGB"]),
        "tiff-rgb16-big-endian": (tiff(rgb16, big=True), eight["RGB"]),
        "tiff-rgba16": (tiff(rgba16), eight["RGBA"]),
        "tiff-grey16-rotated": (
            tiff(g16, orientation=6),
            saved(Image.fromarray(grey).transpose(Image.ROTATE_270)),
        ),
    }
