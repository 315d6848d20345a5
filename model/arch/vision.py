"""The image stage of BLIP-2: the ViT-g encoder, then the Q-Former that distils its patch features into a
few query embeddings.

Module and parameter names follow `transformers` (`vision_model.*`, `qformer.*`) so that checkpoint
tensors load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import QFormerConfig, VisionConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1).to(dtype)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.shape[1]:
            raise ValueError(
                f"pixel_values give {x.shape[1] - 1} patches but the checkpoint has position embeddings for "
                f"{self.position_embedding.shape[1] - 1}: expected images of the configured size"
            )
        return x + self.position_embedding.to(dtype)


class VisionAttention(nn.Module):
    """Self-attention with one fused qkv projection; its bias is [q_bias; 0; v_bias] (no key bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.projection(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    """ViT-g: pixels [B, 3, S, S] -> patch features [B, 1 + (S/P)^2, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be [batch, 3, height, width], got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = split_heads(self.query(x), self.num_heads)
        k = split_heads(self.key(context), self.num_heads)
        v = split_heads(self.value(context), self.num_heads)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class QFormerOutput(nn.Module):
    """BERT's post-sublayer block: dense, then LayerNorm over the residual sum."""

    def __init__(self, cfg: QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(cfg, kv_width)
        self.output = QFormerOutput(cfg, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.attention(x, context, mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """The learned queries (first `num_queries` positions) and any text after them share one
    self-attention; only the queries cross-attend to the image (every `cross_attention_frequency`
    layers) and go through the query FFN (`intermediate_query` / `output_query`); the text goes through
    its own FFN (`intermediate` / `output`), which only retrieval checkpoints carry."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = QFormerAttention(cfg, cfg.hidden_size)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, cfg.encoder_hidden_size)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerOutput(cfg, cfg.intermediate_size)
        if cfg.use_qformer_text_input:
            self.intermediate = QFormerIntermediate(cfg)
            self.output = QFormerOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        image: torch.Tensor | None,
        num_queries: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        nq = x.shape[1] if num_queries is None else num_queries
        x = self.attention(x, x, mask)
        queries, text = x[:, :nq], x[:, nq:]
        parts = []
        if nq:
            if self.has_cross_attention:
                queries = self.crossattention(queries, image)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormerModel(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg)

    def forward(
        self,
        queries: torch.Tensor,
        image: torch.Tensor | None,
        num_queries: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries [B, T, H]: the learned queries, then (retrieval) embedded text; `num_queries` of them
        are queries (all when None); `mask` [B, 1, 1, T] hides text padding."""
        x = self.layernorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, image, num_queries, mask)
        return x
