"""T5 / Flan-T5 (Raffel et al., 2020; Chung et al., 2022), the encoder-decoder language model of
BLIP-2 Flan-T5, with static caches for serving.

    encoder: prompt embeddings --[RMSNorm -> self-attention (+ relative bias) -> RMSNorm -> FF] x N-->
    decoder: start token 0 --[self-attention (causal, own KV cache) -> cross-attention (cached once per
             sequence) -> FF] x N--> lm_head

Parameter names are `transformers`' (`shared`, `encoder.block.{i}.layer.{j}.SelfAttention.q`, ...), so a
checkpoint loads by name. T5 does not scale q·k, folds a bucketed relative position bias (computed by the
first layer, shared by the others) into the scores, and normalises with RMSNorm (no mean, no bias).

Precision, as transformers' T5 (its activations pass fp16's 65504 in real Flan-T5 layers: transformers
#9295, #21574): in a float16 model the feed-forward output projection `wo` keeps float32 weights
(`KEEP_IN_FP32`, transformers' `_keep_in_fp32_modules`), its output is added to the residual stream in
float32, so the stream is float32 from the first feed-forward on; while the stream is still float16, each
residual sum is clamped to fp16's range (`clamp_fp16`); RMSNorm's mean square is taken in float32. In
bfloat16 (float32's range) everything runs in bfloat16, as transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import T5Config
from .kv_cache import AttnBatch, CrossCache
from .vision import merge_heads

# Parameters (names under T5ForConditionalGeneration) that a float16 model keeps in float32.
KEEP_IN_FP32 = (r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo\.weight",)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5Block clamp of a float16 residual stream: into fp16's range, 1000 inside it once
    any value is inf (no host sync: the bound is a device tensor). Other dtypes pass unchanged."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    bound = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-bound, max=bound)


class T5LayerNorm(nn.Module):
    """RMSNorm: the mean square in fp32, the output in the weight's dtype (as transformers). Input of any
    float dtype [..., size] (a float16 model's residual stream is float32 after the first FF)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh-TensorFlow's bucketing of key_pos - query_pos: exact for small distances, log-spaced after."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = num_buckets // 2
    large = (
        exact
        + (
            torch.log(relative.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(relative < exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, bidirectional: bool):
        super().__init__()
        self.cfg, self.heads, self.bidirectional = cfg, cfg.num_heads, bidirectional
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x).view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[B, H, Q, K] from positions q_pos [B, Q] and k_pos [K]."""
        rel = k_pos[None, None, :] - q_pos[:, :, None]
        c = self.cfg
        idx = relative_bucket(
            rel, self.bidirectional, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        return self.relative_attention_bias(idx).permute(0, 3, 1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores_bias: torch.Tensor):
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=scores_bias, scale=1.0
        )
        return self.o(merge_heads(out))


class T5FF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        act = cfg.feed_forward_proj.split("-")[-1]
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if act == "gelu" else getattr(F, act)
        self.gated = cfg.gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] in the model dtype -> [B, T, d_model] in `wo`'s dtype (float32 in a float16
        model: T5's FF output overflows fp16)."""
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(getattr(self.wo, "compute_dtype", None) or self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5FF(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum in the wider of the stream's and `wo`'s dtypes (as transformers: no cast back)."""
        return clamp_fp16(x + self.DenseReluDense(self.layer_norm(x)))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias, bidirectional)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, has_bias=False, bidirectional=True)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool, decoder: bool):
        super().__init__()
        parts: list[nn.Module] = [T5SelfAttentionLayer(cfg, first, bidirectional=not decoder)]
        if decoder:
            parts.append(T5CrossAttentionLayer(cfg))
        parts.append(T5LayerFF(cfg))
        self.layer = nn.ModuleList(parts)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        n = cfg.decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList(T5Block(cfg, i == 0, decoder) for i in range(n))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    @property
    def first_attention(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention


# Flan-T5's decoder cache: its own keys/values, and the encoder output's cross-attention keys/values.
T5Cache = CrossCache


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.shared(ids)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder over right-padded inputs x [B, S, D] with real lengths [B] -> [B, S, D]."""
        b, s, _ = x.shape
        pos = torch.arange(s, device=x.device)
        # Masked scores at the model dtype's own minimum: float32's overflows bf16 / fp16 (an error on CUDA).
        neg = torch.finfo(x.dtype).min
        scores = self.encoder.first_attention.bias(pos.expand(b, s), pos)
        scores = scores.masked_fill((pos[None, :] >= lengths[:, None])[:, None, None, :], neg).to(x.dtype)
        for block in self.encoder.block:
            sa = block.layer[0]
            h = sa.layer_norm(x)
            attn = sa.SelfAttention
            x = clamp_fp16(
                x + attn.attend(attn.split(h, attn.q), attn.split(h, attn.k), attn.split(h, attn.v), scores)
            )
            x = block.layer[1](x)
        return self.encoder.final_layer_norm(x)

    def new_cache(self, num_slots: int, max_len: int, max_source: int, dtype, device) -> T5Cache:
        c = self.cfg
        return T5Cache.empty(
            c.decoder_layers, num_slots, c.num_heads, max_len, max_source, c.d_kv, dtype, device
        )

    def fill_cross(
        self, enc: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, cache: T5Cache
    ) -> None:
        """Project each decoder layer's cross-attention keys/values of `enc` [B, S, D] into `slots`."""
        batch = AttnBatch.prefill(slots, enc.shape[1])
        for i, block in enumerate(self.decoder.block):
            attn = block.layer[1].EncDecAttention
            cache.cross.update(i, batch, attn.split(enc, attn.k), attn.split(enc, attn.v))
        cache.lengths[slots] = lengths.to(cache.lengths.device)

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: T5Cache,
        kv_len: int,
        dense: bool = False,
    ) -> torch.Tensor:
        """One token per row at its decoder position; logits [B, vocab] in fp32."""
        batch = AttnBatch.decode(slots, positions, kv_len, dense)
        return self.decode_tokens(tokens[:, None], batch, cache)[:, 0]

    def decode_tokens(self, tokens: torch.Tensor, batch: AttnBatch, cache: T5Cache) -> torch.Tensor:
        """Tokens [B, T] at `batch.positions` [B, T], each attending to the decoder's keys at positions
        0 .. kv_len - 1 where `batch.mask` [B, 1, T or 1, kv_len] allows (a decode step: T = 1;
        candidate scoring, `model.runtime.scoring`: several); logits [B, T, vocab] in fp32."""
        own = cache.own
        x = self.shared(tokens)
        keys = torch.arange(batch.kv_len, device=x.device)
        neg = torch.finfo(x.dtype).min  # float32's minimum overflows bf16 / fp16 (an error on CUDA)
        self_scores = self.decoder.first_attention.bias(batch.positions, keys)
        self_scores = self_scores.masked_fill(~batch.mask, neg).to(x.dtype)
        src_batch, src_mask = cache.cross_batch(batch.slots, batch.dense)
        cross_scores = torch.zeros(src_mask.shape, dtype=x.dtype, device=x.device).masked_fill(~src_mask, neg)
        for i, block in enumerate(self.decoder.block):
            sa, ca = block.layer[0], block.layer[1]
            h = sa.layer_norm(x)
            attn = sa.SelfAttention
            own.update(i, batch, attn.split(h, attn.k), attn.split(h, attn.v))
            k, v = own.read(i, batch)
            x = clamp_fp16(x + attn.attend(attn.split(h, attn.q), k, v, self_scores))
            h = ca.layer_norm(x)
            k, v = cache.cross.read(i, src_batch)
            cross = ca.EncDecAttention
            x = clamp_fp16(x + cross.attend(cross.split(h, cross.q), k, v, cross_scores))
            x = block.layer[2](x)
        x = self.decoder.final_layer_norm(x)
        if self.cfg.scales_output:
            x = x * self.cfg.d_model**-0.5  # original T5 scales tied outputs; T5 v1.1 / Flan-T5 do not tie
        return self.lm_head(x).float()
