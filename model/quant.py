"""LLM.int8 weight quantization (bitsandbytes `Linear8bitLt`), as the BLIP-2 docs use it.

Like `load_in_8bit` in transformers: the linear layers of the ViT and of the OPT decoder become int8;
the Q-Former (kept fp32), the language projection, embeddings and `lm_head` stay in float.
"""

from __future__ import annotations

import re

import torch
from torch import nn

QUANTIZED = re.compile(
    r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc[12])"
    r"|language_model\.model\.decoder\.layers\.\d+\.(self_attn\.(qkv_proj|out_proj)|fc[12])"
)


def _int8_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=threshold, device="meta",
    )  # fmt: skip
    q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return q.to(device)  # the weights are quantized on this move


def quantize_int8(model: nn.Module, threshold: float = 6.0) -> int:
    """Replace the eligible nn.Linear layers in place; returns how many were replaced."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and QUANTIZED.fullmatch(name)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _int8_linear(linear, threshold))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (int8 weights count one byte each, plus bitsandbytes' fp32 scale
    per output row, `SCB`, which is an attribute of the weight, not a parameter); tied tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        scales = getattr(t, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


def int8_weight_bytes(model: nn.Module) -> int:
    """What `weight_bytes` comes to after `quantize_int8`, counted without quantizing (so it works on a
    model on the meta device, at full size): each quantized weight at one byte per entry plus one fp32
    scale per output row; everything else as it is."""
    targets = {
        id(m.weight): m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and QUANTIZED.fullmatch(name)
    }
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        rows = targets.get(id(t))
        total += t.numel() * t.element_size() if rows is None else t.numel() + 4 * rows
    return total


__all__ = ["QUANTIZED", "int8_weight_bytes", "quantize_int8", "weight_bytes"]
