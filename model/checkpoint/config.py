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
    # The text branch (image-text retrieval checkpoints): its embeddings and feed-forward blocks.
    use_qformer_text_input: bool = False
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    pad_token_id: int = 0


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
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    # transformers 5 writes whether to scale the decoder output by d_model^-0.5 here (and always says
    # tie_word_embeddings); older configs say it with tie_word_embeddings (original T5: tied and scaled).
    scale_decoder_outputs: bool | None = None
    decoder_start_token_id: int = 0
    eos_token_id: int | list[int] = 1
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> T5Config:
        return _pick(cls, {k: v for k, v in raw.items() if v is not None})

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def scales_output(self) -> bool:
        if self.scale_decoder_outputs is not None:
            return self.scale_decoder_outputs
        return self.tie_word_embeddings

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")


@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig | T5Config = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    # Id of the `<image>` placeholder; the current hub configs put `num_query_tokens` of them before BOS.
    # None (older configs) means the query embeddings are simply prepended to the prompt embeddings.
    image_token_index: int | None = None
    architectures: tuple[str, ...] = ()
    # Retrieval (Blip2ForImageTextRetrieval): width of the shared image-text embedding space.
    image_text_hidden_size: int = 256

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Blip2Config:
        text_raw = dict(raw.get("text_config") or {})
        model_type = text_raw.get("model_type", "opt")
        if model_type not in ("opt", "t5"):
            raise ValueError(
                f"text_config.model_type={model_type!r} is not supported (supported: 'opt', 't5')"
            )
        text = T5Config.from_dict(text_raw) if model_type == "t5" else _pick(OPTConfig, text_raw)
        vision = _pick(VisionConfig, raw.get("vision_config") or {})
        qformer_raw = dict(raw.get("qformer_config") or {})
        # transformers overwrites the Q-Former's cross-attention width with the vision width.
        qformer_raw["encoder_hidden_size"] = vision.hidden_size
        return cls(
            vision=vision,
            qformer=_pick(QFormerConfig, qformer_raw),
            text=text,
            num_query_tokens=int(raw.get("num_query_tokens", 32)),
            image_token_index=raw.get("image_token_index", raw.get("image_token_id")),
            architectures=tuple(raw.get("architectures") or ()),
            image_text_hidden_size=int(raw.get("image_text_hidden_size", 256)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Blip2Config:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def is_encoder_decoder(self) -> bool:
        """Flan-T5: the prompt goes through an encoder; the decoder starts from its own start token."""
        return isinstance(self.text, T5Config)

    @property
    def text_hidden(self) -> int:
        return self.text.d_model if isinstance(self.text, T5Config) else self.text.hidden_size

    @property
    def max_text_positions(self) -> int:
        """OPT's learned positions; T5's relative positions have no hard limit (512 as it was trained)."""
        return 512 if isinstance(self.text, T5Config) else self.text.max_position_embeddings

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.text.eos_token_id
        return tuple(eos) if isinstance(eos, list) else (int(eos),)


# BLIP (v1) ---------------------------------------------------------------------------------------------

# transformers' BlipVisionConfig defaults (ViT-B/16 at 384 px), which differ from BLIP-2's ViT-g.
BLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": 16,
    "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class BlipTextConfig:
    """BLIP's BERT: a text encoder and a text decoder with cross-attention in every layer."""

    vocab_size: int = 30524
    hidden_size: int = 768
    encoder_hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    bos_token_id: int = 30522  # [DEC]: the decoder's first token
    pad_token_id: int = 0
    sep_token_id: int = 102  # [SEP]: where a caption or answer ends


@dataclass(frozen=True)
class BlipConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(**BLIP_VISION_DEFAULTS))
    text: BlipTextConfig = field(default_factory=BlipTextConfig)
    image_text_hidden_size: int = 256
    architectures: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BlipConfig:
        vision = _pick(VisionConfig, {**BLIP_VISION_DEFAULTS, **(raw.get("vision_config") or {})})
        text_raw = {k: v for k, v in (raw.get("text_config") or {}).items() if v is not None}
        # As transformers: the text model cross-attends to the vision width.
        text_raw["encoder_hidden_size"] = vision.hidden_size
        return cls(
            vision=vision,
            text=_pick(BlipTextConfig, text_raw),
            image_text_hidden_size=int(raw.get("image_text_hidden_size", 256)),
            architectures=tuple(raw.get("architectures") or ()),
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.text.sep_token_id,)

    @property
    def max_text_positions(self) -> int:
        return self.text.max_position_embeddings


def architecture(cfg: Blip2Config | BlipConfig) -> str:
    """The architecture `config.json`'s `architectures` names (a BLIP-2 generator when it names none)."""
    if cfg.architectures:
        return cfg.architectures[0]
    return "Blip2ForConditionalGeneration" if isinstance(cfg, Blip2Config) else ""


def read_config(path: str | Path) -> Blip2Config | BlipConfig:
    """The config of a BLIP-2 (`model_type` "blip-2") or BLIP (`"blip"`) checkpoint."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    model_type = raw.get("model_type", "blip-2")
    if model_type == "blip":
        return BlipConfig.from_dict(raw)
    if model_type != "blip-2":
        raise ValueError(f"model_type={model_type!r} is not supported (supported: 'blip-2', 'blip')")
    return Blip2Config.from_dict(raw)
