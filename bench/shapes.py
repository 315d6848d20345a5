"""Full-size BLIP-2 configs (the hub's, as dicts) for benchmarks with random weights: no download."""

from __future__ import annotations

VIT_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
         "num_attention_heads": 16, "image_size": 224, "patch_size": 14}  # fmt: skip
QFORMER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "cross_attention_frequency": 2}  # fmt: skip


def _opt(hidden: int, layers: int, heads: int) -> dict:
    return {
        "vision_config": dict(VIT_G),
        "qformer_config": dict(QFORMER),
        "text_config": {
            "model_type": "opt",
            "vocab_size": 50304,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "ffn_dim": 4 * hidden,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": hidden,
            "eos_token_id": 50118,
        },  # fmt: skip
        "num_query_tokens": 32,
        "image_token_index": 50265,
    }


SIZES = {"opt-2.7b": _opt(2560, 32, 32), "opt-6.7b": _opt(4096, 32, 32)}


def shrunk(config: dict, layers: int) -> dict:
    """The same widths with fewer layers: exercises the full-size code path on a small machine."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in ("vision_config", "qformer_config", "text_config"):
        out[key]["num_hidden_layers"] = layers
    return out
