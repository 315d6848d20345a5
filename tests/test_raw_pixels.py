"""Pixels before normalising (`ImageProcessor.rgb`, uint8 [H, W, 3]): what HTTP processes send a CUDA
engine, which normalises them on the device. Bit-equal to `preprocess`, whichever way they arrive."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from live import png_bytes
from PIL import Image

from model import Blip2Engine, SamplingParams
from model.data.image import ImageProcessor
from server.service import Service
from server.settings import Settings


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),  # at the model's size
        Image.fromarray(rng.integers(0, 256, (97, 310, 3), dtype=np.uint8)),  # resized
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L"),  # grey -> RGB
    ]


def test_normalising_rgb_pixels_gives_preprocess_bit_for_bit():
    proc = ImageProcessor()
    images = _images()
    rgb = [proc.rgb(im) for im in images]
    assert all(r.dtype == torch.uint8 and r.shape == (224, 224, 3) for r in rgb)
    for r, im in zip(rgb, images, strict=True):
        assert torch.equal(proc.normalize(r), proc.preprocess(im))
    assert torch.equal(proc.normalize(torch.stack(rgb)), proc(images))  # a batch at once
    with pytest.raises(ValueError, match="uint8"):
        proc.normalize(torch.zeros(224, 224, 3))


@pytest.fixture(scope="module")
def engine(checkpoints) -> Blip2Engine:
    return Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))


def test_the_runner_encodes_rgb_pixels_and_mixed_batches_as_normalised_ones(engine):
    proc, side = engine.image_processor, engine.cfg.vision.image_size
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(3)]
    runner = engine.new_runner(4, 64, 0)
    floats = {f"k{i}": proc.preprocess(im) for i, im in enumerate(images)}
    raw = {f"k{i}": proc.rgb(im) for i, im in enumerate(images)}
    mixed = {"k0": raw["k0"], "k1": floats["k1"], "k2": raw["k2"]}
    keys = list(floats)
    with torch.inference_mode():
        want = runner._encode(floats, keys)
        for pixels in (raw, mixed):
            torch.testing.assert_close(runner._encode(pixels, keys), want, rtol=0, atol=0)


@pytest.mark.parametrize("engine_kind", ["thread", "process"])  # process: uint8 frames over ZMQ
def test_a_server_that_sends_rgb_pixels_answers_as_one_that_sends_normalised_ones(checkpoints, engine_kind):
    settings = Settings(model=str(checkpoints("pre_ln")[0]), device="cpu", engine=engine_kind)
    svc = Service.build(settings)
    blobs = [png_bytes(i) for i in range(3)]

    async def run(raw: bool) -> list[list[int]]:
        svc.images.raw_pixels = raw  # what start() sets for a CUDA engine, or with --raw-pixels
        prepared = await svc.images.prepare(blobs)
        assert all((p.pixel_values.dtype == torch.uint8) is raw for p in prepared)
        params = SamplingParams(max_new_tokens=6)
        requests = [svc.engine.request(p.pixel_values, f"{raw}-{p.key}", None, params) for p in prepared]
        return [o.result.token_ids for o in await svc.generate(requests)]

    async def both() -> tuple:
        await svc.start()
        assert svc.images.raw_pixels is False  # a CPU engine: normalised here
        await svc.warm_up()
        try:
            return await run(True), await run(False)
        finally:
            await svc.shutdown()

    raw, normalised = asyncio.run(both())
    assert raw == normalised
    engine = Blip2Engine.from_pretrained(settings.model)  # (a process server's own is a frontend only)
    offline = [
        r.token_ids
        for r in engine.generate(
            [Image.open(io.BytesIO(b)) for b in blobs], None, SamplingParams(max_new_tokens=6)
        )
    ]
    assert raw == offline


async def _started_raw(svc: Service) -> bool:
    await svc.start()
    try:
        return svc.images.raw_pixels
    finally:
        await svc.shutdown()


def test_the_setting_decides_over_the_device(checkpoints):
    for raw in (True, False):
        settings = Settings(
            model=str(checkpoints("pre_ln")[0]), device="cpu", engine="thread", raw_pixels=raw
        )
        assert asyncio.run(_started_raw(Service.build(settings))) is raw
