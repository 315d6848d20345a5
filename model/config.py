"""BLIP-2 configuration, read from a Hugging Face `config.json`.

Only the fields the forward pass needs are kept; defaults are those of `transformers`' config classes so
that an older or trimmed `config.json` loads the way `transformers` would load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _pick(cls: type, raw: dict[str, Any]) -> Any:
    """Build dataclass `cls` from the keys of `raw` it knows; unknown keys are ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True


@dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 1
    tie_word_embeddings: bool = True
    model_type: str = "opt"

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (OPT-350m projects them in and out of `hidden_size`)."""
        return self.word_embed_proj_dim or self.hidden_size


@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    # Id of the `<image>` placeholder; the current hub configs put `num_query_tokens` of them before BOS.
    # None (older configs) means the query embeddings are simply prepended to the prompt embeddings.
    image_token_index: int | None = None
    architectures: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Blip2Config:
        text_raw = dict(raw.get("text_config") or {})
        model_type = text_raw.get("model_type", "opt")
        if model_type != "opt":
            raise ValueError(
                f"text_config.model_type={model_type!r} is not supported yet (supported: 'opt'); "
                "Flan-T5 checkpoints are tracked separately"
            )
        vision = _pick(VisionConfig, raw.get("vision_config") or {})
        qformer_raw = dict(raw.get("qformer_config") or {})
        # transformers overwrites the Q-Former's cross-attention width with the vision width.
        qformer_raw["encoder_hidden_size"] = vision.hidden_size
        return cls(
            vision=vision,
            qformer=_pick(QFormerConfig, qformer_raw),
            text=_pick(OPTConfig, text_raw),
            num_query_tokens=int(raw.get("num_query_tokens", 32)),
            image_token_index=raw.get("image_token_index", raw.get("image_token_id")),
            architectures=tuple(raw.get("architectures") or ()),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Blip2Config:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.text.eos_token_id
        return tuple(eos) if isinstance(eos, list) else (int(eos),)
