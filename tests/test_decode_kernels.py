"""The decode step's Triton kernels, under Triton's interpreter on the CPU: the attention
(`model.kernels.decode_attention`) against a float64 reference at head sizes that are and are not powers
of two, read in place from a cache's layer slice; the residual add + layer norm
(`model.kernels.add_layer_norm`) against PyTorch's two ops; and a whole tiny OPT decode step with both
equals the step without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from live import ROOT

from model.arch.kv_cache import AttnBatch

KERNEL = textwrap.dedent(
    """
    import torch
    from model.kernels.decode_attention import decode_attention, reference
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        for rows, heads, length, dim in ((1, 2, 7, 8), (3, 4, 70, 80), (5, 2, 130, 64)):
            cache = torch.randn(3, rows + 2, heads, length, dim).to(dtype)  # [layers, slots, heads, len, dim]
            want_cache = cache.double()
            keys, values = cache[1], cache[2]  # one layer's slices, read and written in place
            # q, k, v as the model makes them: views of a fused projection (rows and heads strided).
            qkv = torch.randn(rows, 1, 3, heads, dim).permute(2, 0, 3, 1, 4).to(dtype)
            q, k_new, v_new = (qkv[0] * dim**-0.5).to(dtype), qkv[1], qkv[2]
            pos = torch.randint(0, length, (rows,))
            pos[0] = length - 1 if rows > 1 else 0
            slots = torch.arange(rows)
            live = rows - 1 if rows > 1 else rows
            slots[live:] = rows + 1  # the last row idle: it writes the spare slot (its output is dropped)
            out = decode_attention(q, k_new, v_new, keys, values, pos, slots)
            ref = reference(q.double(), k_new.double(), v_new.double(), want_cache[1], want_cache[2], pos, slots)
            out, ref = out[:live], ref[:live]
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert out.shape == q[:live].shape and out.dtype == dtype and err < tol, (dtype, rows, dim, err)
            assert torch.equal(cache.double(), want_cache), "the cache writes differ"
    print("ok")
    """
)

ADD_NORM = textwrap.dedent(
    """
    import torch
    from torch import nn
    from model.kernels.add_layer_norm import add_layer_norm
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for rows, hidden, affine in ((1, 64, True), (5, 80, True), (3, 40, False)):
            norm = nn.LayerNorm(hidden, elementwise_affine=affine).to(dtype)
            if affine:
                nn.init.normal_(norm.weight)
                nn.init.normal_(norm.bias)
            x, y = torch.randn(rows, 1, hidden).to(dtype), torch.randn(rows, 1, hidden).to(dtype)
            with torch.no_grad():
                total, out = add_layer_norm(x, y, norm)
                s = (x + y).double()  # x + y in the dtype (rounded), as the kernel and PyTorch do
                ref = (s - s.mean(-1, keepdim=True)) / (s.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
                if affine:
                    ref = ref * norm.weight.double() + norm.bias.double()
            assert torch.equal(total, x + y), (dtype, hidden)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert out.shape == x.shape and out.dtype == dtype and err < tol, (dtype, hidden, err)
    print("ok")
    """
)

STEP = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from model import Blip2Engine
    engine = Blip2Engine.from_pretrained(sys.argv[1])
    lm = engine.model.language_model
    cache = engine.model.new_cache(9, 40)
    torch.manual_seed(1)
    cache.k.normal_(); cache.v.normal_()
    tokens, positions, slots = torch.tensor([5, 9, 3, 0]), torch.tensor([7, 2, 35, 0]), torch.tensor([0, 1, 2, 8])
    outs, caches = [], []
    for kernel in (False, True):
        lm.decode_kernel = kernel
        step_cache = engine.model.new_cache(9, 40)
        step_cache.k.copy_(cache.k); step_cache.v.copy_(cache.v)
        with torch.inference_mode():
            outs.append(engine.model.decode(tokens, positions, slots, step_cache, 36, dense=True)[:3])
        caches.append(step_cache)
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert err < 1e-5, err
    # The kernel wrote each row's keys/values where the indexed write did, and nothing else (the trash
    # slot 8 holds an idle row's, which differ: an idle row's attention is not SDPA's, and is dropped).
    for name in ("k", "v"):
        before, sdpa, kernel = (getattr(c, name) for c in (cache, caches[0], caches[1]))
        assert torch.allclose(sdpa[:, :8], kernel[:, :8], atol=1e-6)
        assert torch.equal(sdpa != before, kernel != before)  # the same places written
    print("ok")
    """
)


def _interpret(script: str, *args: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kernel_under_the_interpreter_matches_a_float64_reference():
    _interpret(KERNEL)


SELF_CHECKS = textwrap.dedent(
    """
    import torch
    from model.kernels import add_layer_norm, decode_attention
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16):
        assert decode_attention.self_check(4, 80, dtype, cpu), dtype
        assert add_layer_norm.self_check(80, dtype, cpu), dtype
    print("ok")
    """
)


@pytest.mark.slow  # the whole self-check under Triton's interpreter: ~9 s
def test_the_self_checks_pass_under_the_interpreter():
    _interpret(SELF_CHECKS)


def test_add_layer_norm_under_the_interpreter_matches_a_float64_reference():
    _interpret(ADD_NORM)


def test_a_decode_step_with_the_kernels_equals_the_step_without(checkpoints):
    _interpret(STEP, str(checkpoints("pre_ln")[0]))


def test_the_kernel_is_asked_for_only_in_dense_decode_steps_and_then_needs_no_mask():
    slots, positions = torch.tensor([0, 1]), torch.tensor([3, 5])
    assert AttnBatch.decode(slots, positions, 8, dense=True, kernel=True).mask is None
    gathered = AttnBatch.decode(slots, positions, 8, dense=False, kernel=True)
    assert not gathered.kernel and gathered.mask is not None


def test_the_decode_attention_backend_is_chosen_when_the_model_is_built(tmp_path):
    """The backend is a constructor argument (`model.kernels.backend`): SDPA without CUDA (the eager
    fallback), the Triton kernels' flag on OPT's modules only when built with "triton"."""
    from model.checkpoint.config import read_config
    from model.checkpoint.loader import build_empty, load_model
    from model.checkpoint.tiny import write_tiny_checkpoint
    from model.kernels.backend import choose_decode_attention

    root = write_tiny_checkpoint(tmp_path)
    cfg = read_config(root / "config.json")
    cpu = torch.device("cpu")
    assert choose_decode_attention(cfg, torch.float32, cpu, "triton") == "sdpa"
    with pytest.raises(ValueError, match="decode attention"):
        choose_decode_attention(cfg, torch.float32, cpu, "flash")
    built = build_empty(cfg, torch.float32, torch.device("meta"), "triton")
    assert built.decode_attention == "triton" and built.language_model.decode_kernel
    loaded = load_model(root)
    assert loaded.decode_attention == "sdpa" and not loaded.language_model.decode_kernel
    assert loaded.capabilities.static_prefill and loaded.capabilities.generates
