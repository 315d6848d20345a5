"""The decode attention backend, chosen before the model is built (`model.checkpoint.loader`).

"triton": OPT's decode step with its Triton kernels (attention, `decode_attention`; residual add + layer
norm, `add_layer_norm`); "sdpa": PyTorch's masked attention and ops (the eager fallback, everywhere).
"""

from __future__ import annotations

import torch

from ..arch.family import DECODE_ATTENTION
from ..checkpoint.config import Blip2Config, BlipConfig, OPTConfig, architecture
from . import add_layer_norm, decode_attention

BACKEND_CHOICES = ("auto", *DECODE_ATTENTION)


def choose_decode_attention(
    cfg: Blip2Config | BlipConfig, dtype: torch.dtype, device: torch.device, requested: str = "auto"
) -> str:
    """ "triton" for a BLIP-2 OPT generator on CUDA when asked ("auto" or "triton") and both kernels pass
    their self-checks on this device and dtype (they compute what PyTorch does); "sdpa" otherwise.
    ValueError for a `requested` not in `BACKEND_CHOICES`."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"decode attention must be one of {BACKEND_CHOICES}, got {requested!r}")
    opt = isinstance(cfg, Blip2Config) and isinstance(cfg.text, OPTConfig)
    if requested == "sdpa" or device.type != "cuda" or not opt:
        return "sdpa"
    if architecture(cfg) != "Blip2ForConditionalGeneration":
        return "sdpa"
    text = cfg.text
    heads = text.num_attention_heads
    ok = decode_attention.self_check(heads, text.hidden_size // heads, dtype, device)
    ok = ok and add_layer_norm.self_check(text.hidden_size, dtype, device)
    return "triton" if ok else "sdpa"
