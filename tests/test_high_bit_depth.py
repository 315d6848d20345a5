"""Images of more than 8 bits per sample are their 8-bit picture (v >> 8 for 16 bits), where PIL's
conversion, and so transformers, clips them (Pillow #2574, #5991): each high-depth file gives exactly the
pixels of the 8-bit file of the same picture, as transformers preprocesses that one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from deep_images import deep_cases, png
from PIL import Image

from model.data.image import ImageProcessor, decode_image, to_8bit
from server.inputs import prepare_image

CASES = deep_cases()
SIZE = 56


def _transformers(image: Image.Image) -> torch.Tensor:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    hf = BlipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return torch.from_numpy(np.asarray(hf(image, return_tensors="np")["pixel_values"]))[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_high_depth_file_is_its_8bit_picture(name):
    deep, eight = CASES[name]
    processor = ImageProcessor(height=SIZE, width=SIZE)
    want = _transformers(Image.open(io.BytesIO(eight)))
    # What the server hands the engine: normalised pixels, or (a CUDA engine) resized uint8 RGB.
    assert torch.equal(prepare_image(deep, processor, 10**6).pixel_values, want)
    raw = prepare_image(deep, processor, 10**6, raw=True).pixel_values
    assert torch.equal(raw, prepare_image(eight, processor, 10**6, raw=True).pixel_values)
    assert torch.equal(processor.normalize(raw), want)
    # The Python API's path: a PIL image as Image.open gives it.
    assert torch.equal(processor.preprocess(Image.open(io.BytesIO(deep))), want)


def test_mid_grey_16_bit_png_is_mid_grey():
    """The report's case: PIL's conversion made this picture 253.9 of 255 on average."""
    decoded = decode_image(png(np.full((8, 8), 0x8080, dtype=np.uint16)))
    assert decoded.mode == "L" and np.asarray(decoded).tolist() == [[128] * 8] * 8


@pytest.mark.parametrize(
    ("array", "want"),
    [
        # In memory, without a file to say its depth: the I;16 modes and I hold 16 bits.
        (np.array([[0, 255, 256, 0x8080, 65535]], dtype=np.uint16), [0, 0, 1, 128, 255]),
        (np.array([[-5, 0, 256, 0x8080, 65535, 70000]], dtype=np.int32), [0, 0, 1, 128, 255, 255]),
        # Floats are taken in 0..1.
        (np.array([[-1, 0, 0.5, 1 / 255, 1, 2, np.nan]], dtype=np.float32), [0, 0, 128, 1, 255, 255, 0]),
    ],
)
def test_scaling_of_each_mode_in_memory(array, want):
    image = Image.fromarray(array)
    assert image.mode in ("I;16", "I", "F")
    assert np.asarray(to_8bit(image)).tolist() == [want]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I", "F"])
def test_in_memory_images_match_transformers_on_their_8bit_picture(mode):
    rng = np.random.default_rng(3)
    eight = rng.integers(0, 256, (31, 45), dtype=np.uint8)
    deep = (eight.astype(np.int64) << 8) | rng.integers(0, 256, eight.shape)
    if mode == "F":
        image = Image.fromarray(eight.astype(np.float32) / 255)
    elif mode == "I":
        image = Image.fromarray(deep.astype(np.int32))
    else:
        order = {"I;16B": ">u2", "I;16L": "<u2"}.get(mode, "=u2")
        image = Image.frombytes(mode, (45, 31), deep.astype(order).tobytes())
    assert image.mode == mode
    processor = ImageProcessor(height=SIZE, width=SIZE)
    assert torch.equal(processor.preprocess(image), _transformers(Image.fromarray(eight)))
