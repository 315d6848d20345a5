"""Decode attention in Triton: each row's new key/value written into the cache, and its one new query
attended over that row's cached keys, read in place.

In the fixed-shape decode step (`model.runtime.static_decode`), row r reads cache slot r up to a bucketed length
and a boolean mask cuts each row at its own position. PyTorch's SDPA with a mask picks a generic kernel
(an H100 measured 53 us per call at 64 rows, about 4x what the keys and values take to read), and the new
keys/values were written before it by two `index_put` kernels. Here one program per (row, head) writes
the row's new key and value, then walks its cached keys in blocks only up to its own position (no mask,
no read past it), with an online softmax in fp32, and adds the new key from registers: every key and
value is read once, and nothing it wrote is read back.

Inputs follow the cache's layout ([slots, heads, max_len, head_dim] per layer, head_dim contiguous); the
query is already scaled (OPT scales q before the product). head_dim need not be a power of two (OPT-2.7b:
80): it is padded to one in registers, masked on load. Under `TRITON_INTERPRET=1` the same kernel runs
on the CPU (CI checks it against a float64 reference).
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: SDPA serves there
    triton = None

log = logging.getLogger(__name__)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, out_ptr,
        stride_qb, stride_qh, stride_nb, stride_nh, stride_ks, stride_kh, stride_kl, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims, mask=in_dim, other=0.0).to(tl.float32)
        last = tl.load(pos_ptr + row)  # the row's own position: cached keys 0..last-1, then its new one
        # The new key and value go into the cache (at the row's write slot), and into the sum from here.
        new_at = row * stride_nb + head * stride_nh + dims
        k_new = tl.load(kn_ptr + new_at, mask=in_dim, other=0.0)
        v_new = tl.load(vn_ptr + new_at, mask=in_dim, other=0.0)
        write = tl.load(slot_ptr + row) * stride_ks + head * stride_kh + last * stride_kl + dims
        tl.store(k_ptr + write, k_new, mask=in_dim)
        tl.store(v_ptr + write, v_new, mask=in_dim)
        base = row * stride_ks + head * stride_kh
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, last, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            valid = keys < last
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
        score = tl.sum(k_new.to(tl.float32) * q, axis=0)
        new_best = tl.maximum(best, score)
        rescale = tl.exp(best - new_best)
        p = tl.exp(score - new_best)
        acc = acc * rescale + p * v_new.to(tl.float32)
        out = acc / (total * rescale + p)
        tl.store(
            out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim
        )


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Write each row's new key/value [B, H, 1, D] into keys/values [slots, H, L, D] at (`slots[r]`,
    `positions[r]`), and attend with q [B, H, 1, D] (scaled) over slot r's keys up to and including
    `positions[r]` (row r reads slot r; a live row writes its own slot, an idle one the trash slot).
    Returns [B, H, 1, D] in q's dtype. One kernel: no index_put for the cache write, no mask."""
    if triton is None:
        raise RuntimeError("the decode attention kernel needs triton")
    b, h, one, d = q.shape
    if (
        one != 1
        or k_new.shape != q.shape
        or v_new.shape != q.shape
        or keys.shape[1] != h
        or keys.shape[3] != d
    ):
        raise ValueError(
            f"expected q, k_new, v_new [B, H, 1, D] and keys/values [slots, H, L, D]; got {tuple(q.shape)}, "
            f"{tuple(k_new.shape)}, {tuple(v_new.shape)}, {tuple(keys.shape)}"
        )
    if (
        keys.shape != values.shape
        or keys.stride() != values.stride()
        or keys.stride(3) != 1
        or keys.shape[0] < b
    ):
        raise ValueError("keys/values: one shape and strides, head_dim contiguous, a slot per row")
    if positions.shape != (b,) or slots.shape != (b,):
        raise ValueError(
            f"positions and slots must be [{b}], got {tuple(positions.shape)}, {tuple(slots.shape)}"
        )
    q = q if q.stride(3) == 1 else q.contiguous()
    if k_new.stride() != v_new.stride() or k_new.stride(3) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    out = torch.empty_like(q)
    _decode_attention_kernel[(b, h)](
        q, k_new, v_new, keys, values, positions, slots, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=64,
    )  # fmt: skip
    return out


def reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """What the kernel does, with an indexed write and PyTorch's masked SDPA (the eager decode step)."""
    b, length = q.shape[0], keys.shape[2]
    keys[slots, :, positions] = k_new[:, :, 0]
    values[slots, :, positions] = v_new[:, :, 0]
    mask = (torch.arange(length, device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys[:b], values[:b], attn_mask=mask, scale=1.0
    )


def self_check(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The kernel against `reference` on random data at a few row counts and lengths; False (and a
    warning) if it fails to run or differs."""
    if triton is None:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for rows, length in ((2, 32), (7, 96), (64, 160)):  # the last row of each is idle
            shape = (rows + 1, heads, length, head_dim)
            keys = torch.randn(shape, generator=gen, device=device).to(dtype)
            values = torch.randn(shape, generator=gen, device=device).to(dtype)
            q, k_new, v_new = (
                torch.randn((rows, heads, 1, head_dim), generator=gen, device=device).to(dtype)
                for _ in range(3)
            )
            positions = torch.randint(0, length, (rows,), generator=gen, device=device)
            slots = torch.arange(rows, device=device)
            slots[-1] = rows  # an idle row: it writes the spare slot
            k_ref, v_ref = keys.float(), values.float()
            want = reference(
                q.float() * head_dim**-0.5, k_new.float(), v_new.float(), k_ref, v_ref, positions, slots
            )
            got = decode_attention(q * head_dim**-0.5, k_new, v_new, keys, values, positions, slots).float()
            err = ((got[:-1] - want[:-1]).norm() / want[:-1].norm()).item()
            if not err < 1e-2 or not torch.allclose(keys.float(), k_ref, atol=1e-3):
                log.warning("decode attention kernel differs from SDPA (%d rows, %.2e): not used", rows, err)
                return False
    except Exception as exc:  # noqa: BLE001 - any failure leaves SDPA serving
        log.warning(
            "decode attention kernel failed its self-check (%s: %s): not used", type(exc).__name__, exc
        )
        return False
    return True
