"""--quantize int8: weight-only int8 (W8A16) of the language model's layer linears, per-row scales.

Checked as the scheme it is: transformers, run with the weights `q * scale`, gives our tokens (greedy and
beams, OPT and Flan-T5, offline and served). The Triton kernel runs under the interpreter on the CPU."""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch
from conftest import random_pixels
from live import ROOT, b64, png_bytes, serve_in_thread
from oracle import hf_generate
from PIL import Image

from model import Blip2Engine, SamplingParams
from model.runtime.quant import Int8Linear, dequantize_rows, quantize_rows, quantize_w8a16, weight_bytes
from server.settings import Settings

# transformers' names of the linears the scheme quantizes (OPT's q/k/v are one fused linear in ours:
# per-row scales make quantizing the fused matrix the same as quantizing each).
HF_TARGETS = re.compile(
    r".*language_model\..*(self_attn\.(q|k|v|out)_proj|\.fc[12]|(SelfAttention|EncDecAttention)\.[qkvo]"
    r"|DenseReluDense\.(wi|wi_0|wi_1|wo))"
)


def test_rows_quantize_within_half_a_step_and_zero_rows_stay_zero():
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]
    w[2] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (6,)
    assert (q.abs().amax(dim=1)[[0, 1, 3, 4, 5]] == 127).all()  # each row uses the full range
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all() and (dequantize_rows(q, scale)[2] == 0).all()


def _dequantized_reference(hf):
    """transformers' model with each quantized linear's weight replaced by `q * scale`."""
    ref = copy.deepcopy(hf)
    count = 0
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and HF_TARGETS.fullmatch(name):
            module.weight.data = dequantize_rows(*quantize_rows(module.weight.data))
            count += 1
    assert count
    return ref


@pytest.mark.parametrize("variant", ["pre_ln", "t5"])
def test_int8_tokens_equal_transformers_with_the_dequantized_weights(checkpoints, variant):
    root, hf = checkpoints(variant)
    ref = _dequantized_reference(hf)
    engine = Blip2Engine.from_pretrained(str(root))
    fp32_bytes = weight_bytes(engine.model)
    layers = quantize_w8a16(engine.model)
    assert layers and all(not m.kernel for m in engine.model.modules() if isinstance(m, Int8Linear))
    assert weight_bytes(engine.model) < fp32_bytes
    pixels = random_pixels(3, seed=11)
    prompts = [None, "Question: what is it? Answer:", None]
    for beams in (1, 3):
        params = SamplingParams(max_new_tokens=8, num_beams=beams)
        ours = [r.token_ids for r in engine.generate(list(pixels), prompts, params)]
        for px, prompt, got in zip(pixels, prompts, ours, strict=True):
            ids = engine.cfg.num_query_tokens * [engine.cfg.image_token_index] + engine.text_ids(prompt)
            assert got == hf_generate(ref, px, ids, max_new_tokens=8, num_beams=beams), (variant, beams)


def test_served_int8_reports_itself_and_equals_offline(checkpoints):
    root = str(checkpoints("pre_ln")[0])
    engine = Blip2Engine.from_pretrained(root)
    quantize_w8a16(engine.model)
    data = png_bytes(4)
    settings = Settings(model=root, device="cpu", quantize="int8", max_wait_ms=1, engine="thread")
    with serve_in_thread(settings) as url:
        info = httpx.get(url + "/v1/models").json()["data"][0]
        assert info["quantization"] == "int8" and info["weight_bytes"] > 0
        r = httpx.post(url + "/caption", json={"image": b64(data), "max_new_tokens": 6, "num_beams": 2})
    pixels = engine.image_processor.preprocess(Image.open(io.BytesIO(data)))
    want = engine.generate([pixels], None, SamplingParams(max_new_tokens=6, num_beams=2))[0].text
    assert r.status_code == 200 and r.json()["caption"] == want


CHECK = textwrap.dedent(
    """
    import torch
    from model.kernels.w8a16 import w8a16_matmul
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for m, k, n, bias in ((1, 40, 70, True), (5, 72, 33, False), (17, 128, 64, True), (33, 64, 130, True)):
            x = torch.randn(m, k).to(dtype)
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            s = ((torch.rand(n) + 0.5) / 100).to(dtype)
            b = torch.randn(n).to(dtype) if bias else None
            y = w8a16_matmul(x, q, s, b)
            ref = x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if bias else 0)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert y.shape == (m, n) and y.dtype == dtype and err < tol, (dtype, m, k, n, err)
    print("ok")
    """
)


def test_triton_kernel_under_the_interpreter_matches_a_float64_reference():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
