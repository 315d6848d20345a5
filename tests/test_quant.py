"""--quantize llm.int8: bitsandbytes LLM.int8 layers, on CPU."""

from __future__ import annotations

import httpx
import pytest
import torch
from live import b64, png_bytes, serve_in_thread

from bench.shapes import SIZES
from model import Blip2Engine, SamplingParams
from model.checkpoint.config import Blip2Config
from model.runtime.quant import int8_weight_bytes, quantize_int8, weight_bytes
from server.settings import Settings


def test_int8_replaces_vit_and_opt_linears_and_stays_close(checkpoints):
    import bitsandbytes as bnb

    engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    pixels = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_embeds = engine.model.encode_images(pixels)
    ref = engine.generate(list(pixels), None, SamplingParams(max_new_tokens=16))
    before = weight_bytes(engine.model)
    layers = engine.model.language_model.model.decoder.layers
    linear_params = sum(m.weight.numel() for layer in layers for m in (layer.self_attn.qkv_proj, layer.fc1))

    predicted = int8_weight_bytes(engine.model)
    assert quantize_int8(engine.model) == 2 * 4 + 2 * 4  # ViT: qkv, projection, fc1, fc2; OPT likewise
    qkv = layers[0].self_attn.qkv_proj
    assert isinstance(qkv, bnb.nn.Linear8bitLt) and qkv.weight.dtype == torch.int8
    assert engine.model.qformer.layernorm.weight.dtype == torch.float32  # Q-Former untouched
    assert weight_bytes(engine.model) < before - 3 * linear_params  # int8 weights: 1 byte instead of 4
    assert weight_bytes(engine.model) == predicted  # the count below is bitsandbytes' real storage

    with torch.no_grad():
        embeds = engine.model.encode_images(pixels)
    assert (embeds - ref_embeds).abs().max() < 0.05 * ref_embeds.abs().max()
    out = engine.generate(list(pixels), None, SamplingParams(max_new_tokens=16))
    pairs = [
        (a, b) for r, o in zip(ref, out, strict=True) for a, b in zip(r.token_ids, o.token_ids, strict=False)
    ]
    assert sum(a == b for a, b in pairs) / len(pairs) > 0.5


def test_server_runs_int8(checkpoints):
    settings = Settings(
        model=str(checkpoints("pre_ln")[0]), device="cpu", quantize="llm.int8", max_wait_ms=1, engine="thread"
    )
    with serve_in_thread(settings) as url:
        info = httpx.get(url + "/v1/models").json()["data"][0]
        assert info["quantization"] == "llm.int8" and info["weight_bytes"] > 0
        r = httpx.post(url + "/caption", json={"image": b64(png_bytes(1)), "max_new_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("size", sorted(SIZES))
def test_int8_weights_take_at_most_60_percent_of_fp16_at_full_size(size):
    """blip2-opt-2.7b / -6.7b shapes on the meta device (no memory): int8 vs fp16 weight bytes. The Q-Former
    stays fp32 and embeddings / lm_head (tied) stay fp16 in both."""
    from model.checkpoint.loader import build_empty

    with torch.device("meta"):
        model = build_empty(Blip2Config.from_dict(SIZES[size]), torch.float16, torch.device("meta"))
    lm = model.language_model
    lm.lm_head.weight = lm.model.decoder.embed_tokens.weight  # tied, as loading does
    fp16 = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ratio = int8_weight_bytes(model) / fp16
    assert 0.4 < ratio <= 0.6, f"{size}: LLM.int8 weights are {ratio:.0%} of fp16"
    # W8A16 leaves the ViT (1B parameters) in fp16: 67% for opt-2.7b, 59% for opt-6.7b.
    w8a16 = int8_weight_bytes(model, "int8") / fp16
    assert ratio < w8a16 < 0.7, f"{size}: W8A16 weights are {w8a16:.0%} of fp16"
