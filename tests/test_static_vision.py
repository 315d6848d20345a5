"""The vision stage at padded batch sizes (`model.runtime.static_vision`): padding rows change nothing in the real
ones, and the stage is capturable (no host sync, no host->device copy inside it), for every image encoder."""

from __future__ import annotations

import pytest
import torch
from test_static_decode import HOST_OPS, RecordOps

from model import Blip2Engine
from model.data.image import ImageProcessor
from model.runtime.static_vision import StaticVision, batch_ladder


def test_batch_ladder():
    assert batch_ladder(1) == [1]
    assert batch_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert batch_ladder(24) == [1, 2, 4, 8, 16, 24]
    with pytest.raises(ValueError, match=">= 1"):
        batch_ladder(0)


@pytest.fixture(scope="module", params=["pre_ln", "t5", "blip_caption", "blip2_itm"])
def encoder(request, checkpoints):
    root = checkpoints(request.param)[0]
    side = ImageProcessor.from_dir(root).height
    return Blip2Engine.from_pretrained(str(root)).model, side


def test_padded_rows_change_nothing_in_the_real_ones(encoder):
    model, side = encoder
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randn(3, 3, side, side, generator=gen)
    padded = torch.cat([pixels, 50 * torch.randn(1, 3, side, side, generator=gen)])  # bucket 4, wild padding
    with torch.inference_mode():
        want, got = model.encode_images(pixels), model.encode_images(padded)[:3]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_vision_stage_has_no_host_sync_or_host_copy(encoder):
    model, side = encoder
    pixels = torch.randn(2, 3, side, side)
    with torch.inference_mode(), RecordOps() as rec:
        out = model.encode_images(pixels)
    assert out.shape[0] == 2
    assert not (rec.names & HOST_OPS), sorted(rec.names & HOST_OPS)


def test_vision_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: tests/test_cuda.py captures them")
    with pytest.raises(ValueError, match="CUDA"):
        StaticVision(lambda x: x, 4, (3, 8, 8), torch.device("cpu"))
