"""BLIP's text transformer (Li et al., 2022): BERT with a cross-attention block in every layer.

    encoder (bidirectional): a question or caption attends to itself and, by cross-attention, to the
                             image features -> question embeddings (VQA) or matching features (ITM)
    decoder (causal, cached): [DEC] + text attends to its past (own KV cache) and to a source (image
                              features for captions, question embeddings for VQA) -> next token

Each layer is post-LN BERT: self-attention, cross-attention, feed-forward, each followed by LayerNorm
over the residual sum. Parameter names are `transformers`' (`embeddings.word_embeddings`,
`encoder.layer.{i}.attention.self.query`, `cls.predictions.*`), so checkpoints load by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import BlipTextConfig
from .kv_cache import AttnBatch, CrossCache
from .vision import QFormerIntermediate, QFormerOutput, activation, merge_heads, split_heads


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BlipTextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, kv_width] -> keys, values [B, H, S, D]."""
        return split_heads(self.key(context), self.num_heads), split_heads(
            self.value(context), self.num_heads
        )


class BertAttention(nn.Module):
    """Attention (`self`), then the post-LN residual block (`output`)."""

    def __init__(self, cfg: BlipTextConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = QFormerOutput(cfg, cfg.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        q = split_heads(self.self.query(x), self.self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.output(merge_heads(out), x)


class BertLayer(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_hidden_size)
        self.intermediate = QFormerIntermediate(cfg)
        self.output = QFormerOutput(cfg, cfg.intermediate_size)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


class BlipTextEmbeddings(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


def key_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 1, 1, width]: True at each row's first `lengths[b]` (real, unpadded) key positions."""
    keys = torch.arange(width, device=lengths.device)
    return (keys[None, :] < lengths[:, None])[:, None, None, :]


def pad_ids(rows: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B]."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


class BlipTextModel(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BlipTextEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def encode(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        context: torch.Tensor | None = None,
        context_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bidirectional pass over right-padded ids [B, T] (real lengths [B]) -> hidden [B, T, H].

        With `context` [B, S, encoder_hidden_size] every layer also cross-attends to it (the image);
        without, the cross-attention blocks are skipped (a text-only embedding, as transformers)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, length], got {tuple(ids.shape)}")
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embeddings(ids, positions)
        mask = key_mask(lengths, ids.shape[1])
        if context is not None and context_lengths is None:
            context_lengths = torch.full_like(lengths, context.shape[1])
        ctx_mask = key_mask(context_lengths, context.shape[1]) if context is not None else None
        for layer in self.encoder.layer:
            x = layer.attention(x, *layer.attention.self.keys_values(x), mask)
            if context is not None:
                x = layer.crossattention(x, *layer.crossattention.self.keys_values(context), ctx_mask)
            x = layer.feed_forward(x)
        return x

    def fill_cross(
        self, context: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, cache: CrossCache
    ) -> None:
        """Project each layer's cross-attention keys/values of `context` [B, S, C] into `slots`."""
        batch = AttnBatch.prefill(slots, context.shape[1])
        for i, layer in enumerate(self.encoder.layer):
            cache.cross.update(i, batch, *layer.crossattention.self.keys_values(context))
        cache.lengths[slots] = lengths.to(cache.lengths.device)

    def decode(self, ids: torch.Tensor, batch: AttnBatch, cache: CrossCache) -> torch.Tensor:
        """Causal pass of ids [B, T] at `batch.positions`, writing the own KV cache, cross-attending to
        the cached source of each slot -> hidden [B, T, H]. Prefill rows are whole right-padded
        prompts (a causal mask keeps pads out of real rows); decode rows are one token each."""
        x = self.embeddings(ids, batch.positions)
        src_batch, src_mask = cache.cross_batch(batch.slots, batch.dense)
        for i, layer in enumerate(self.encoder.layer):
            k, v = layer.attention.self.keys_values(x)
            cache.own.update(i, batch, k, v)
            if batch.is_prefill:
                x = layer.attention(x, k, v, causal=True)
            else:
                x = layer.attention(x, *cache.own.read(i, batch), batch.mask)
            x = layer.crossattention(x, *cache.cross.read(i, src_batch), src_mask)
            x = layer.feed_forward(x)
        return x

    def new_cache(
        self, num_slots: int, max_len: int, max_source: int, dtype: torch.dtype, device: torch.device
    ) -> CrossCache:
        c = self.cfg
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the text model's {c.max_position_embeddings} positions"
            )
        head_dim = c.hidden_size // c.num_attention_heads
        return CrossCache.empty(
            c.num_hidden_layers,
            num_slots,
            c.num_attention_heads,
            max_len,
            max_source,
            head_dim,
            dtype,
            device,
        )


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """transform -> vocabulary projection (tied to the word embeddings) + its own bias."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class OnlyMLMHead(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class BlipTextLMHeadModel(nn.Module):
    """The text decoder: `bert` (cached, causal) and the `cls` head; logits in fp32."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.bert = BlipTextModel(cfg)
        self.cls = OnlyMLMHead(cfg)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden).float()
