"""How the runner runs: its options, and the checks that decide which fast paths a model can take on
a device (fixed-shape prefill, the decode step's Triton kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.kv_cache import KVCache
from ..kernels import add_layer_norm, decode_attention


@dataclass(frozen=True)
class DecodeOptions:
    """How the runner runs decode steps."""

    # The fixed-shape step over slots [0, rows) (`model.runtime.static_decode`); off: rows gathered from their slots.
    static: bool = True
    # Replay that step as CUDA graphs (only on a CUDA device; ignored elsewhere).
    cuda_graphs: bool = True
    # Keys are read up to the next multiple of this many positions (fewer shapes vs less padding).
    kv_step: int = 32
    # With CUDA graphs: the vision stage is captured at batch sizes 1, 2, 4, ... up to this (0: eager).
    vision_batch: int = 0
    # With CUDA graphs: prefills too, at (requests, positions) buckets (OPT-based BLIP-2).
    prefill_graphs: bool = True
    # On CUDA: the decode step's Triton kernels (OPT: attention; residual add + layer norm), once they
    # pass their self-checks; else PyTorch's ops.
    attention_kernel: bool = True
    # Offline generate: launch each decode step before reading the last one's tokens when the batch
    # allows it (`StepPlan.chainable`); None: on CUDA. (The server's loop has `--overlap`.)
    overlap: bool | None = None


def choose_decode_kernels(
    model: torch.nn.Module, options: DecodeOptions, device: torch.device, int8: bool
) -> None:
    """The decode step's Triton kernels (attention; residual add + layer norm) for an OPT language model
    on CUDA (not with bitsandbytes' LLM.int8, `int8`), if asked and if they compute what PyTorch does on
    this device; PyTorch's ops otherwise."""
    lm = getattr(model, "language_model", None)
    if not hasattr(lm, "decode_kernel"):
        return
    use = options.attention_kernel and device.type == "cuda" and not int8
    if use:
        cfg, dtype = lm.cfg, model.lm_dtype
        heads = cfg.num_attention_heads
        use = decode_attention.self_check(heads, cfg.hidden_size // heads, dtype, device)
        use = use and add_layer_norm.self_check(cfg.hidden_size, dtype, device)
    lm.decode_kernel = use


def prefills_static(model: torch.nn.Module, cache: object) -> bool:
    """BLIP-2 with a decoder-only language model (OPT) has a fixed-shape prefill; Flan-T5 and BLIP do not."""
    return hasattr(model, "prefill_static") and type(cache) is KVCache


def bnb_int8(model: torch.nn.Module) -> bool:
    """bitsandbytes' LLM.int8 finds outlier columns with host-side indexing: not capturable."""
    return any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
