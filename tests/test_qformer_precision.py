"""The Q-Former's precision setting (`--qformer-precision`): auto (transformers' choice: float32 in a float16
model, else the model dtype), float32, tf32, or the model dtype; what each does to the weights, and how far
the model dtype moves the query embeddings."""

from __future__ import annotations

import pytest
import torch

from batching.engine_process import load_engine
from model import Blip2Engine
from model.arch.blip2 import tf32_matmuls
from server.settings import Settings


@pytest.fixture(scope="module")
def root(checkpoints) -> str:
    return str(checkpoints("pre_ln")[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_each_precision_sets_the_qformer_weights(root, dtype):
    model = Blip2Engine.from_pretrained(root, dtype=dtype).model
    auto = torch.float32 if dtype == torch.float16 else dtype
    assert {p.dtype for p in model.qformer.parameters()} == {auto}  # as loaded: auto
    for precision, want, tf32 in (
        ("model", dtype, False),
        ("tf32", torch.float32, True),
        ("float32", torch.float32, False),
        ("auto", auto, False),
    ):
        model.set_qformer_precision(precision)
        assert {p.dtype for p in model.qformer.parameters()} == {want}
        assert model.query_tokens.dtype == want and model.qformer_tf32 is tf32
    with pytest.raises(ValueError, match="float32"):
        model.set_qformer_precision("fp8")


def test_the_model_dtype_qformer_stays_close_to_float32(root):
    engine = Blip2Engine.from_pretrained(root, dtype="bfloat16")
    side = engine.cfg.vision.image_size
    pixels = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        engine.model.set_qformer_precision("float32")
        want = engine.model.encode_images(pixels).float()
        engine.model.set_qformer_precision("model")
        got = engine.model.encode_images(pixels).float()
    assert got.dtype == want.dtype and not torch.equal(got, want)  # it did run in bf16
    assert (got - want).norm() / want.norm() < 3e-2


def test_tf32_switch_is_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_the_setting_reaches_the_loaded_engine(root, checkpoints):
    engine = load_engine(Settings(model=root, device="cpu", dtype="bfloat16", qformer_precision="float32"))
    assert {p.dtype for p in engine.model.qformer.parameters()} == {torch.float32}
    engine = load_engine(Settings(model=root, device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in engine.model.qformer.parameters()} == {torch.bfloat16}  # auto
    with pytest.raises(ValueError, match="BLIP-2 caption/vqa"):
        load_engine(Settings(model=str(checkpoints("blip2_itm")[0]), device="cpu", qformer_precision="tf32"))
