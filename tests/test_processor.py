"""Image preprocessing and tokenization against transformers' BlipImageProcessorPil and tokenizers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from oracle import write_tokenizer_files
from PIL import Image

from model.checkpoint.tiny import train_tokenizer
from model.data.image import ImageError, ImageProcessor, decode_image
from model.data.tokenizer import TextTokenizer


def _hf_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": 224, "width": 224})


def _gradient(mode: str, size=(173, 61)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P-transparent":
        p = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 3
        return p
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "P-transparent", "CMYK", "1"])
def test_pixels_match_blip_image_processor(mode):
    """8-bit modes. (Deeper ones differ on purpose: transformers clips them; see test_high_bit_depth.)"""
    image = _gradient(mode)
    ours = ImageProcessor()([image])
    ref = torch.from_numpy(np.asarray(_hf_processor()(image, return_tensors="np")["pixel_values"]))
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), (225, 224), (640, 480)])
def test_odd_sizes_match(size):
    image = _gradient("RGB", size)
    ref = torch.from_numpy(np.asarray(_hf_processor()(image, return_tensors="np")["pixel_values"]))
    torch.testing.assert_close(ImageProcessor()([image]), ref, atol=1e-6, rtol=0)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    rgb = decode_image(data).convert("RGB")
    assert rgb.getpixel((8, 8))[0] > 200 and rgb.getpixel((8, 8))[2] < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"GIF89a not really", "not an image"), (b"\x00" * 100, "not an image")],
)
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_image_raises_image_error():
    data = _encode(_gradient("RGB", (200, 200)), "PNG")
    with pytest.raises(ImageError, match="truncated|corrupt|not an image"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_checked_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError, match="9000000 pixels"):
        decode_image(data, max_pixels=1_000_000)


TEXTS = [
    "a photo of",
    "Question: what is in the picture? Answer:",
    "",
    "  spaces  and ünïcödé 🐱\n",
    "<image> x",
]


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_tokenizer_matches_transformers(tmp_path, add_bos_token):
    from transformers import AutoTokenizer

    write_tokenizer_files(tmp_path, add_bos_token=add_bos_token)
    ours = TextTokenizer.from_dir(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=True).strip()
    # transformers 5 takes BOS from tokenizer.json's post-processor, whatever add_bos_token says.
    assert ours.encode("a")[0] == 2


def test_vocab_merges_fallback(tmp_path):
    tok = train_tokenizer()
    tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    assert (tmp_path / "vocab.json").exists()
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "</s>", "add_bos_token": true}')
    ours = TextTokenizer.from_dir(tmp_path)
    ids = tok.encode("two dogs playing", add_special_tokens=True).ids
    assert ours.encode("two dogs playing") == ids
    assert ours.decode(ids) == "two dogs playing"


def test_animated_webp_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 255, 0), (255, 0, 0)]]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(data).convert("RGB").getpixel((8, 8)) == (0, 255, 0)


def test_pil_decompression_bomb_is_an_error():
    data = _encode(Image.new("1", (20000, 20000)), "PNG")  # 4e8 pixels: past PIL's own error limit
    with pytest.raises(ImageError, match="more pixels than the limit"):
        decode_image(data, max_pixels=10**10)


def test_exotic_formats_are_refused():
    with pytest.raises(ImageError, match="unsupported image format"):
        decode_image(_encode(Image.new("RGB", (8, 8)), "PPM"))
