"""Decode attention in Triton: one new query per row against that row's cached keys, read in place.

In the fixed-shape decode step (`model.static_decode`), row r reads cache slot r up to a bucketed length
and a boolean mask cuts each row at its own position. PyTorch's SDPA with a mask picks a generic kernel
(an H100 measured 53 us per call at 64 rows, about 4x what the keys and values take to read). Here one
program per (row, head) walks that row's keys in blocks only up to its own position (no mask, and no
read past it), with an online softmax in fp32: every key and value is read once.

Inputs follow the cache's layout ([slots, heads, max_len, head_dim] per layer, head_dim contiguous); the
query is already scaled (OPT scales q before the product). head_dim need not be a power of two (OPT-2.7b:
80): it is padded to one in registers, masked on load. Under `TRITON_INTERPRET=1` the same kernel runs
on the CPU (CI checks it against a float64 reference).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: SDPA serves there
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_kl, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims, mask=in_dim, other=0.0).to(tl.float32)
        last = tl.load(pos_ptr + row)  # the row's own position: keys 0..last
        base = row * stride_ks + head * stride_kh
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, last + 1, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            valid = keys <= last
            offs = base + keys[:, None] * stride_kl + dims[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best)
            v = tl.load(v_ptr + offs, mask=valid[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            total = total * rescale + tl.sum(p, axis=0)
            best = new_best
        out = acc / total
        tl.store(
            out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim
        )


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """q [B, H, 1, D] (scaled) against keys/values [>=B, H, L, D] (row r reads slot r) up to and including
    `positions[r]` (< L); returns [B, H, 1, D] in q's dtype."""
    if triton is None:
        raise RuntimeError("the decode attention kernel needs triton")
    b, h, one, d = q.shape
    if one != 1 or keys.shape[1:] != values.shape[1:] or keys.shape[1] != h or keys.shape[3] != d:
        raise ValueError(
            f"expected q [B, H, 1, D] and keys/values [slots, H, L, D]; got {tuple(q.shape)}, "
            f"{tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if (
        keys.shape[0] < b
        or positions.shape != (b,)
        or keys.stride(3) != 1
        or keys.stride() != values.stride()
    ):
        raise ValueError(
            "keys/values need a slot per row, head_dim contiguous and equal strides; positions [B]"
        )
    if q.stride(3) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    _decode_attention_kernel[(b, h)](
        q, keys, values, positions, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=64,
    )  # fmt: skip
    return out


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """What the kernel computes, with PyTorch's masked SDPA (the eager decode step's attention)."""
    b, length = q.shape[0], keys.shape[2]
    mask = (torch.arange(length, device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys[:b], values[:b], attn_mask=mask, scale=1.0
    )


def self_check(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The kernel against `reference` on random data at a few row counts and lengths; False (and a
    warning) if it fails to run or differs."""
    import logging

    log = logging.getLogger(__name__)
    if triton is None:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for rows, length in ((1, 32), (7, 96), (64, 160)):
            shape = (rows + 1, heads, length, head_dim)
            keys = torch.randn(shape, generator=gen, device=device).to(dtype)
            values = torch.randn(shape, generator=gen, device=device).to(dtype)
            q = (torch.randn((rows, heads, 1, head_dim), generator=gen, device=device) * head_dim**-0.5).to(
                dtype
            )
            positions = torch.randint(0, length, (rows,), generator=gen, device=device)
            want = reference(q.float(), keys.float(), values.float(), positions)
            got = decode_attention(q, keys, values, positions).float()
            err = ((got - want).norm() / want.norm()).item()
            if not err < 1e-2:
                log.warning("decode attention kernel differs from SDPA (%d rows, %.2e): not used", rows, err)
                return False
    except Exception as exc:  # noqa: BLE001 - any failure leaves SDPA serving
        log.warning(
            "decode attention kernel failed its self-check (%s: %s): not used", type(exc).__name__, exc
        )
        return False
    return True
