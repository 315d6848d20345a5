"""int8 weights, two schemes.

- `quantize_w8a16` (`--quantize int8`): weight-only int8 of the language model's decoder-layer linears
  (OPT: fused q/k/v, out, fc1, fc2; Flan-T5: q, k, v, o, wi, wo), one scale per output row:
  `scale = max|row| / 127`, `q = round(w / scale)` in [-127, 127]. The matmul reads the int8 weights
  (`model.kernels.w8a16` on CUDA; dequantize-then-matmul on the CPU). The vision encoder, Q-Former,
  projection, embeddings and lm_head stay in the model dtype. Exactly this scheme is what the tests check:
  transformers run with the weights `q * scale` gives our tokens.
- `quantize_int8` (`--quantize llm.int8`): bitsandbytes' LLM.int8 (`Linear8bitLt`, outlier decomposition),
  as `load_in_8bit` in transformers: the linears of the ViT and the OPT decoder. Slower than fp16.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.w8a16 import available as w8a16_available
from ..kernels.w8a16 import w8a16_matmul

log = logging.getLogger(__name__)

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


W8A16 = re.compile(
    r"language_model\.model\.decoder\.layers\.\d+\.(self_attn\.(qkv_proj|out_proj)|fc[12])"
    r"|language_model\.(encoder|decoder)\.block\.\d+\.layer\.\d+\."
    r"(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))"
)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] and one scale per row [N] (in the weight's dtype): w ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    scale = scale.to(weight.dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weights `quantize_rows` stands for, in float32 (what the reference model is given)."""
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and per-row scales (W8A16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype  # activations in and out (T5's wo stays fp32)
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        self.kernel = False  # the Triton kernel, once its self-check passed on this device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            return w8a16_matmul(x, self.qweight, self.scale, self.bias)
        weight = dequantize_rows(self.qweight, self.scale).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def quantize_w8a16(model: nn.Module) -> int:
    """Replace the language model's decoder-layer linears in place (see the module docstring); on CUDA
    they use the Triton kernel if it computes what the torch path does. Returns how many were replaced."""
    targets = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and W8A16.fullmatch(name)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8Linear(linear))
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if layers and layers[0].qweight.is_cuda:
        ok = kernel_self_check(layers[0])
        for layer in layers:
            layer.kernel = ok
    return len(targets)


def kernel_self_check(layer: Int8Linear) -> bool:
    """The Triton kernel against the dequantize-and-matmul path at decode and prefill row counts."""
    if not w8a16_available():
        log.warning("triton is not installed: int8 weights are dequantized for every matmul (slow)")
        return False
    try:
        for rows in (1, 7, 64, 300):
            x = torch.randn(rows, layer.in_features, device=layer.qweight.device, dtype=layer.compute_dtype)
            want = F.linear(x.float(), dequantize_rows(layer.qweight, layer.scale), layer.bias)
            got = w8a16_matmul(x, layer.qweight, layer.scale, layer.bias).float()
            err = ((got - want).norm() / want.norm()).item()
            if not err < 1e-2:
                log.warning("W8A16 kernel differs from the reference at %d rows (%.2e): not used", rows, err)
                return False
    except Exception as exc:
        log.warning("W8A16 kernel failed its self-check (%s: %s): not used", type(exc).__name__, exc)
        return False
    return True


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


def int8_weight_bytes(model: nn.Module, scheme: str = "llm.int8") -> int:
    """What `weight_bytes` comes to after quantizing (`llm.int8`: `quantize_int8`, fp32 scales; `int8`:
    `quantize_w8a16`, scales in the weight's dtype), counted without quantizing, so it works on a model
    on the meta device, at full size: each quantized weight at one byte per entry plus one scale per
    output row; everything else as it is."""
    pattern = QUANTIZED if scheme == "llm.int8" else W8A16
    targets = {
        id(m.weight): m.out_features * (4 if scheme == "llm.int8" else m.weight.element_size())
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(name)
    }
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        scales = targets.get(id(t))
        total += t.numel() * t.element_size() if scales is None else t.numel() + scales
    return total


__all__ = [
    "QUANTIZED",
    "W8A16",
    "Int8Linear",
    "dequantize_rows",
    "int8_weight_bytes",
    "quantize_int8",
    "quantize_rows",
    "quantize_w8a16",
    "weight_bytes",
]
