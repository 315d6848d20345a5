"""Image-text retrieval: matching scores and embeddings (BLIP-2 `Blip2ForImageTextRetrieval`, BLIP
`BlipForImageTextRetrieval`).

Two heads, as in both papers:
- ITC (contrastive): image and text embedded apart, L2-normalised into one space; their similarity is a
  dot product (BLIP-2: the best of its 32 query embeddings). Cheap, for search over many items.
- ITM (matching): the text attends to the image (BLIP-2: through the Q-Former with the learned queries;
  BLIP: through the text encoder's cross-attention) and a 2-way head says match / no match.

Both share `encode_images` (the ViT, once per image; the runner caches its output) with captioning.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import Blip2Config, BlipConfig
from ..runtime.plan import RetrievalOutput, RetrievalWork
from .bert import BlipTextModel, key_mask, pad_ids
from .blip2 import QFORMER_KEEP_IN_FP32
from .family import Capabilities
from .vision import QFormerModel, VisionModel


def similarity(image: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """ITC score of one image's embeddings [Q, D] with texts [N, D]: the best query for each text [N]."""
    return (image @ texts.T).max(dim=0).values


class _Retriever(nn.Module):
    """A `RetrievalModel` (`model.arch.family`): no cache, no generation."""

    capabilities = Capabilities(retrieves=True)

    @property
    def device(self) -> torch.device:
        return self.vision_model.post_layernorm.weight.device

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.vision_model.post_layernorm.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> image features [B, 1 + patches, vision hidden size]."""
        return self.vision_model(pixel_values)


class Blip2ForImageTextRetrieval(_Retriever):
    keep_in_fp32 = QFORMER_KEEP_IN_FP32  # in a float16 model, as transformers

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        # The text branch's feed-forward blocks are what retrieval uses the Q-Former's text path for.
        q = replace(cfg.qformer, use_qformer_text_input=True)
        self.cfg = replace(cfg, qformer=q)
        self.vision_model = VisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, q.hidden_size))
        self.embeddings = QFormerTextEmbeddings(q.vocab_size, q.max_position_embeddings, q.hidden_size)
        self.qformer = QFormerModel(q)
        self.vision_projection = nn.Linear(q.hidden_size, cfg.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, cfg.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, S, Hv] -> [B, num_query_tokens, D]: each query's normalised embedding."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(queries, features.to(queries.dtype))
        return F.normalize(self.vision_projection(out.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_embeddings(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ids [B, T] -> [B, D]: the normalised [CLS] output of the Q-Former's text branch."""
        x = self.embeddings(ids).to(self.query_tokens.dtype)
        out = self.qformer(x, None, num_queries=0, mask=key_mask(lengths, ids.shape[1]))
        return F.normalize(self.text_projection(out[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def match_logits(self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (no, yes) of text row b about image row b: the queries and the text in one
        Q-Former pass, the queries cross-attending to the image; the head averaged over the queries."""
        nq = self.cfg.num_query_tokens
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        text = self.embeddings(ids)
        # As transformers: the queries join the text in the embeddings' dtype, then go to the Q-Former's.
        x = torch.cat([queries.to(text.dtype), text], dim=1).to(queries.dtype)
        mask = key_mask(lengths + nq, x.shape[1])
        out = self.qformer(x, features.to(queries.dtype), num_queries=nq, mask=mask)
        return self.itm_head(out[:, :nq].to(self.itm_head.weight.dtype)).mean(dim=1).float()


class QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the Q-Former's text (normalised with the queries, by the
    Q-Former's own LayerNorm)."""

    def __init__(self, vocab_size: int, max_positions: int, hidden: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(positions)[None]


class BlipForImageTextRetrieval(_Retriever):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.text_encoder = BlipTextModel(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.hidden_size, cfg.image_text_hidden_size)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.image_text_hidden_size)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, S, Hv] -> [B, 1, D]: the normalised projection of the image's CLS feature."""
        return F.normalize(self.vision_proj(features[:, :1]), dim=-1)

    def text_embeddings(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, D]: the normalised projection of the text encoder's [CLS] output (no image)."""
        return F.normalize(self.text_proj(self.text_encoder.encode(ids, lengths)[:, 0]), dim=-1)

    def match_logits(self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2]: the text encoded against the image; the head on its [CLS] output."""
        hidden = self.text_encoder.encode(ids, lengths, features.to(self.itm_head.weight.dtype))
        return self.itm_head(hidden[:, 0]).float()


def run_retrievals(
    model: Blip2ForImageTextRetrieval | BlipForImageTextRetrieval,
    works: list[RetrievalWork],
    features: dict[str, torch.Tensor],
) -> dict[int, RetrievalOutput]:
    """Answer a step's retrieval requests in three batched passes: every text's embedding, every
    (image, text) pair's ITM logits, every image's embeddings. `features`: image features by key."""
    device = model.device
    texts = [ids for w in works for ids in w.texts]
    text_emb = model.text_embeddings(*pad_ids(texts, 0, device)) if texts else None
    pairs = [(w.image_key, ids) for w in works if w.task == "match" for ids in w.texts]
    itm = None
    if pairs:
        feats = torch.stack([features[key] for key, _ in pairs])
        itm = model.match_logits(feats, *pad_ids([ids for _, ids in pairs], 0, device)).softmax(-1)[:, 1]
    keys = sorted({w.image_key for w in works if w.image_key})
    image_emb: dict[str, torch.Tensor] = {}
    if keys:
        embedded = model.image_embeddings(torch.stack([features[k] for k in keys]))
        image_emb = dict(zip(keys, embedded, strict=True))
    results, t, p = {}, 0, 0
    for w in works:
        n = len(w.texts)
        out = RetrievalOutput()
        mine = text_emb[t : t + n] if n else None
        if w.task == "match":
            out.itm = itm[p : p + n].tolist()
            out.itc = similarity(image_emb[w.image_key], mine).float().tolist()
            p += n
        else:
            out.image_embedding = image_emb[w.image_key].float().tolist() if w.image_key else []
            out.text_embeddings = mine.float().tolist() if n else []
        t += n
        results[w.seq_id] = out
    return results
