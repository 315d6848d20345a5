"""OPT decoder (Zhang et al., 2022) with a static slot KV cache.

Parameter names follow `transformers` (`model.decoder.*`, `lm_head`) except that each layer's
q/k/v projections are fused into one `qkv_proj` (one GEMM instead of three); the loader's mapping
table fills its three slices from `q_proj`, `k_proj` and `v_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import OPTConfig
from ..kernels.add_layer_norm import add_layer_norm
from ..kernels.decode_attention import decode_attention
from .kv_cache import AttnBatch, KVCache
from .vision import activation, merge_heads

# OPT's learned positions are stored with an offset of 2 (a fairseq legacy): position p uses row p + 2.
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if self.head_dim * self.num_heads != cfg.hidden_size:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} must be divisible by num_attention_heads {self.num_heads}"
            )
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.enable_bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, x: torch.Tensor, layer: int, batch: AttnBatch, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # transformers scales q before the dot product (scaling=1.0 afterwards); do the same for parity.
        q, k, v = qkv[0] * self.scaling, qkv[1], qkv[2]
        if batch.kernel:  # writes k, v into the cache itself; each row up to its own position
            out = decode_attention(
                q, k, v, cache.k[layer], cache.v[layer], batch.positions[:, 0], batch.slots
            )
            return self.out_proj(merge_heads(out))
        cache.update(layer, batch, k, v)
        if batch.is_prefill:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        else:
            keys, values = cache.read(layer, batch)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask, scale=1.0)
        return self.out_proj(merge_heads(out))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.act = activation(cfg.activation_function)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, layer: int, batch: AttnBatch, cache: KVCache) -> torch.Tensor:
        # OPT-350m is post-LN (normalise after each residual sum); every other size is pre-LN.
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        attended = self.self_attn(h, layer, batch, cache)
        if self.pre_ln and batch.kernel:  # the residual sum and the MLP's norm in one kernel
            x, h = add_layer_norm(x, attended, self.final_layer_norm)
            return x + self.fc2(self.act(self.fc1(h)))
        x = x + attended
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_ln else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        projected = cfg.embed_dim != cfg.hidden_size
        self.project_in = nn.Linear(cfg.embed_dim, cfg.hidden_size, bias=False) if projected else None
        self.project_out = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False) if projected else None
        has_final_ln = cfg.do_layer_norm_before and not cfg._remove_final_layer_norm
        affine = cfg.layer_norm_elementwise_affine
        self.final_layer_norm = (
            nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine) if has_final_ln else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    def __init__(self, cfg: OPTConfig, decode_kernel: bool = False):
        """`decode_kernel`: dense decode steps use the Triton kernels (attention; residual add + layer
        norm), chosen by the loader once their self-checks passed (`model.kernels.backend`)."""
        super().__init__()
        self.cfg = cfg
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.decode_kernel = decode_kernel

    @property
    def decoder(self) -> OPTDecoder:
        return self.model.decoder

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> inputs in the decoder's hidden space (after `project_in` where there is one)."""
        x = self.decoder.embed_tokens(ids)
        return self.decoder.project_in(x) if self.decoder.project_in is not None else x

    def forward(self, inputs: torch.Tensor, batch: AttnBatch, cache: KVCache) -> torch.Tensor:
        """inputs [B, T, hidden] (already embedded) -> final hidden states [B, T, embed_dim]."""
        x = inputs + self.decoder.embed_positions(batch.positions + POSITION_OFFSET).to(inputs.dtype)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, i, batch, cache)
        if self.decoder.final_layer_norm is not None:
            x = self.decoder.final_layer_norm(x)
        return self.decoder.project_out(x) if self.decoder.project_out is not None else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32, as `generate` takes them, whatever the model dtype."""
        return self.lm_head(hidden).float()

    def new_cache(self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_position_embeddings {self.cfg.max_position_embeddings}"
            )
        head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
        return KVCache(
            self.cfg.num_hidden_layers,
            num_slots,
            self.cfg.num_attention_heads,
            max_len,
            head_dim,
            dtype,
            device,
        )
