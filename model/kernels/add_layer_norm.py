"""Residual add and layer norm in one Triton kernel: s = x + y; out = layer_norm(s).

In a pre-LN decoder layer the attention's output is added to the residual stream and the sum is
normalised for the MLP: two kernels, the sum written and read back in between. At decode sizes each is a
few microseconds of mostly latency (an H100 measured 8.8 us per layer norm at 64 rows inside the decode
graph); here one program per row reads x and y once and writes the sum and its norm. The sum is rounded to
the model dtype before it is normalised, as the two-kernel path does, so both give the same numbers.
Under `TRITON_INTERPRET=1` the same kernel runs on the CPU (CI checks it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: the two-kernel path serves there
    triton = None

log = logging.getLogger(__name__)


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr, y_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, n, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        at = row * n + cols
        x = tl.load(x_ptr + at, mask=inside, other=0.0)
        y = tl.load(y_ptr + at, mask=inside, other=0.0)
        s = x + y  # in the model dtype, as `x + y` is
        tl.store(sum_ptr + at, s, mask=inside)
        s = s.to(tl.float32)
        mean = tl.sum(s, axis=0) / n
        centred = tl.where(inside, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n + eps)
        out = centred * rstd
        if HAS_WEIGHT:
            out = out * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out = out + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=inside)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) for x, y [..., hidden] of one dtype, in one kernel."""
    if triton is None:
        raise RuntimeError("the add + layer norm kernel needs triton")
    hidden = x.shape[-1]
    if x.shape != y.shape or x.dtype != y.dtype or tuple(norm.normalized_shape) != (hidden,):
        raise ValueError(
            f"expected x and y of one shape [..., {tuple(norm.normalized_shape)}] and dtype; got "
            f"{tuple(x.shape)} {x.dtype}, {tuple(y.shape)} {y.dtype}"
        )
    x, y = x.contiguous(), y.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    weight, bias = norm.weight, norm.bias
    _add_layer_norm_kernel[(x.numel() // hidden,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, total, out,
        hidden, norm.eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(hidden),
    )  # fmt: skip
    return total, out


def reference(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-kernel path the kernel replaces."""
    total = x + y
    return total, norm(total)


def self_check(hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The kernel against `reference` on random rows; False (and a warning) if it fails or differs."""
    if triton is None:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    norm = nn.LayerNorm(hidden, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    try:
        for rows in (1, 64):
            x = torch.randn((rows, 1, hidden), generator=gen, device=device).to(dtype)
            y = torch.randn((rows, 1, hidden), generator=gen, device=device).to(dtype)
            with torch.inference_mode():
                want, got = reference(x, y, norm), add_layer_norm(x, y, norm)
            for a, b in zip(got, want, strict=True):
                err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                if not err < 1e-2:
                    log.warning("add + layer norm kernel differs (%.2e): not used", err)
                    return False
    except Exception as exc:  # noqa: BLE001 - any failure leaves the two-kernel path serving
        log.warning("add + layer norm kernel failed its self-check (%s): not used", exc)
        return False
    return True
