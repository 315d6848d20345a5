"""Image decoding and preprocessing, pixel for pixel as `transformers`' `BlipImageProcessorPil`:
RGB (alpha composited on white) -> PIL resize (bicubic) -> x/255 -> (x - mean) / std.

One deliberate difference: an image of more than 8 bits per sample is first brought to its 8-bit picture
(`to_8bit`). PIL's own conversion of those modes to RGB clips instead of scaling, so a mid-grey 16-bit
picture arrives almost white, in transformers too (Pillow #2574, #5991)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Formats users send; others PIL can open (EPS via Ghostscript, etc.) are refused.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed (checked before decoding)."""


ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
BITS_PER_SAMPLE, SAMPLE_FORMAT = 258, 339  # TIFF tags


# Modes whose samples hold more than 8 bits. (PIL itself keeps 16-bit RGB, RGBA and grey+alpha files as
# 8-bit RGB / RGBA, by each sample's high byte: v >> 8, what `to_8bit` gives the grey modes.)
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


@dataclass(frozen=True)
class SampleDepth:
    """What a file declares about its samples: `bits` per sample, and whether they are signed integers."""

    bits: int = 16
    signed: bool = False


def file_depth(image: Image.Image) -> SampleDepth | None:
    """The sample depth an opened, not yet loaded, image file declares, from its decoder's raw mode (PNG
    "I;16B", "RGB;16B", TIFF "I;12", "I;16S", "I;32N"...), where that says more than 8 bits; else None.
    Read it before `load()`: loading forgets the raw mode."""
    tile = getattr(image, "tile", None)
    if not tile:
        return _tiff_depth(image)
    args = tile[0].args
    rawmode = args if isinstance(args, str) else args[0] if args and isinstance(args[0], str) else ""
    found = re.search(r";(\d+)([A-Z]*)$", rawmode)
    if found is None or int(found[1]) <= 8 or "F" in found[2]:
        return None  # 8 bits or fewer, or floating point (`to_8bit` scales floats by value, not bits)
    return SampleDepth(int(found[1]), "S" in found[2])


def _tiff_depth(image: Image.Image) -> SampleDepth | None:
    """A loaded TIFF's sample depth, from its BitsPerSample and SampleFormat tags (kept after loading)."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(BITS_PER_SAMPLE) if tags is not None else None
    if not bits or int(bits[0]) <= 8 or tags.get(SAMPLE_FORMAT, (1,))[0] == 3:  # 3: floating point
        return None
    return SampleDepth(int(bits[0]), tags.get(SAMPLE_FORMAT, (1,))[0] == 2)  # 2: signed integer


def to_8bit(image: Image.Image, depth: SampleDepth | None = None) -> Image.Image:
    """An image of more than 8 bits per sample -> its 8-bit picture ("L"); other modes are returned as
    they are (with an RGB colour key brought to 8 bits, for a file of `depth` > 8 bits).

    Integer samples of `depth.bits` (default: the file's, else 16, what the I;16 modes hold and how PIL
    keeps 16-bit PNG and PGM data in mode I) keep their high 8 bits: v >> (bits - 8), so a 16-bit sample v
    becomes v >> 8; signed samples keep 0..2**(bits-1)-1 the same way, negative values are black. Floats
    ("F") are taken in 0..1, the convention of float image files and arrays: round(v * 255), clipped. A
    colour key (`info["transparency"]`) is brought to 8 bits the same way, so each high-depth image is
    exactly its 8-bit version. PIL's own conversion clips instead (a mid-grey 16-bit picture comes out
    white). Returns a new image, or `image` itself when it has 8 bits per sample.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        key = image.info.get("transparency")
        if not isinstance(key, tuple) or (depth := depth or file_depth(image)) is None:
            return image
        image = image.copy()  # PIL kept the high bytes of the samples but not of the colour key
        image.info["transparency"] = tuple(int(v) >> (depth.bits - 8) for v in key)
        return image
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8))
    depth = depth or file_depth(image) or SampleDepth()  # before np.asarray loads it
    out = Image.fromarray(_shift(np.asarray(image).astype(np.int64), depth))
    key = image.info.get("transparency")
    if isinstance(key, int):
        out.info["transparency"] = int(_shift(np.array([key], dtype=np.int64), depth)[0])
    return out


def _shift(values: np.ndarray, depth: SampleDepth) -> np.ndarray:
    """Integer samples of `depth` -> uint8, their high 8 bits."""
    if depth.bits == 32 and not depth.signed:
        values = values & 0xFFFFFFFF  # PIL holds unsigned 32-bit samples in int32
    bits = depth.bits - 1 if depth.signed else depth.bits
    top = (1 << bits) - 1
    return (np.clip(values, 0, top) >> max(bits - 8, 0)).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """As `transformers.image_transforms.convert_to_rgb`: transparency is composited onto white; but an
    image of more than 8 bits per sample is its 8-bit picture first (`to_8bit`), where transformers clips."""
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> Image.Image:
    """Bytes -> upright PIL image of 8 bits per sample (EXIF orientation applied, first frame of
    animations; more bits as `to_8bit`, at the depth the file declares).

    The pixel count is checked from the header, before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has more pixels than the limit ({exc})") from None
    except Exception as exc:  # PIL raises several types for undecodable input
        raise ImageError(
            f"not an image this server reads (send JPEG, PNG, GIF, WebP, BMP or TIFF bytes){_why(exc)}"
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, more than the limit {max_pixels}"
        )
    if image.format not in ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {image.format}; use one of {sorted(ALLOWED_FORMATS)}")
    try:
        image.seek(0)
        depth = file_depth(image)
        image.load()
        if image.getexif().get(ORIENTATION, 1) != 1:  # else upright already (exif_transpose would copy)
            image = ImageOps.exif_transpose(image) or image
        return to_8bit(image, depth)
    except Exception as exc:
        raise ImageError(f"image data is truncated or corrupt{_why(exc)}") from None


def _why(exc: Exception) -> str:
    """PIL's own reason, when it says more than its exception's class name."""
    text = str(exc).strip()
    return f": {text}" if text and "cannot identify image file" not in text else ""


@dataclass(frozen=True)
class ImageProcessor:
    height: int = 224
    width: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dir(cls, root: str | Path, default_size: int = 224) -> ImageProcessor:
        path = Path(root) / "preprocessor_config.json"
        raw = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        size = raw.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        return cls(
            height=int(size.get("height", default_size)),
            width=int(size.get("width", default_size)),
            mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            std=tuple(raw.get("image_std", CLIP_STD)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
        )

    @cached_property
    def table(self) -> np.ndarray:
        """[3, 256] float32: each channel's pixel value after rescaling and normalising, computed with
        transformers' own steps (rescale in float64 then float32, normalise in float32), so a lookup
        gives exactly what those steps give, at a fraction of their cost."""
        x = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
        return (x[None, :] - mean[:, None]) / std[:, None]

    @cached_property
    def _device_tables(self) -> dict[torch.device, torch.Tensor]:
        return {}

    def rgb(self, image: Image.Image) -> torch.Tensor:
        """One PIL image resized, before normalising: [height, width, 3] uint8, a quarter of the bytes
        of `preprocess`'s output (a CUDA engine takes these and normalises them on the device)."""
        return torch.from_numpy(np.array(self._resized(image)))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """[..., height, width, 3] uint8 (on any device) -> [..., 3, height, width] float32 there,
        bit-equal to `preprocess` (the same table, looked up)."""
        if rgb.dtype != torch.uint8 or rgb.shape[-3:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 [..., {self.height}, {self.width}, 3], got {rgb.dtype} {tuple(rgb.shape)}"
            )
        table = self._device_tables.get(rgb.device)
        if table is None:  # once per device: a copy up from pageable memory can make the host wait
            table = self._device_tables.setdefault(rgb.device, torch.from_numpy(self.table).to(rgb.device))
        channels = torch.arange(3, device=rgb.device)
        return table[channels, rgb.long()].movedim(-1, -3).contiguous()

    def _resized(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        if image.size != (self.width, self.height):  # at its size already, resize() would only copy
            image = image.resize((self.width, self.height), resample=self.resample)
        return image

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> pixel_values [3, height, width] float32."""
        rgb = np.asarray(self._resized(image))
        out = np.empty((3, self.height, self.width), dtype=np.float32)
        for c in range(3):  # the table lookup of each channel, written in place
            np.take(self.table[c], rgb[..., c], out=out[c])
        return torch.from_numpy(out)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images])
