"""Weight-only int8 matmul (W8A16) in Triton: y = x @ (q * scale)^T + bias.

The weights stay int8 in memory ([N, K], as nn.Linear stores them) with one scale per output row; a
decode step reads half the bytes of fp16 weights, and at few rows a decode step is bound by those reads.
Tiles are fixed (no autotuning while serving), K is a constexpr (a compile-time loop bound, which the
interpreter also needs), accumulation is fp32, scale and bias are applied in the epilogue, and there are
no atomics (deterministic). Under `TRITON_INTERPRET=1` the same kernel runs on the CPU (CI checks it).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: the torch path serves there
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _w8a16_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
        M, N, stride_xm, stride_wn, stride_ym,
        K: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                mask=(offs_m[:, None] < M) & (ks[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + ks[:, None],
                mask=(offs_n[None, :] < N) & (ks[:, None] < K),
                other=0,
            )
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            y,
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )


def tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for `m` rows: one row tile at decode sizes (each weight tile is read
    once per row tile, so fewer row tiles means fewer weight reads)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64


def w8a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., K] (fp16 / bf16 / fp32) times int8 qweight [N, K] with per-row `scale` [N] -> [..., N]."""
    if triton is None:
        raise RuntimeError("the W8A16 kernel needs triton")
    k = x.shape[-1]
    n, kw = qweight.shape
    if kw != k or scale.shape != (n,):
        raise ValueError(f"expected x [..., {kw}], qweight [N, K] and scale [N]; got {tuple(x.shape)}, "
                         f"{tuple(qweight.shape)}, {tuple(scale.shape)}")  # fmt: skip
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a16_kernel[grid](
        x2, qweight, scale, bias if bias is not None else scale, y,
        m, n, x2.stride(0), qweight.stride(0), y.stride(0),
        K=k, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
