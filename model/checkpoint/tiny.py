"""`tiny-random`: a deterministic, tiny BLIP-2 built in memory, with a real (small, trained) BPE tokenizer.

It lets the server start and answer on any machine without a download. Its answers are gibberish.
The same builders write tiny checkpoints for tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = """\
a photo of a cat sitting on a couch next to a remote control
two dogs playing in the snow on a sunny day
a man riding a bike down a city street
a woman holding an umbrella in the rain
a bowl of fruit on a wooden table
a plate of food with broccoli and rice
a red bus parked at the side of the road
a group of people standing around a kitchen
an airplane flying over a mountain range
a close up of a pizza with cheese and tomatoes
Question: what is in the picture? Answer: a cat
Question: how many dogs are there? Answer: two
Question: what color is the bus? Answer: red
Question: where is the man? Answer: on the street
"""
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"
NEWLINE = "\u010a"  # byte-level BPE's symbol for "\n", OPT's stop token


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE laid out as OPT's: <s>=0 <pad>=1 </s>=2 <unk>=3, BOS `</s>` prepended, `<image>` last."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    tok.add_special_tokens([IMAGE_TOKEN])
    return tok


def tiny_config(tok: Tokenizer, **text_overrides: Any) -> dict[str, Any]:
    """A config.json dict in the Hugging Face layout (the current one: `<image>` placeholders)."""
    text = {
        "model_type": "opt",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 128,
        "max_position_embeddings": 256,
        "word_embed_proj_dim": 64,
        "do_layer_norm_before": True,
        "bos_token_id": 2,
        "pad_token_id": 1,
        "eos_token_id": tok.token_to_id(NEWLINE),
        "activation_function": "relu",
        "enable_bias": True,
        "tie_word_embeddings": True,
        **text_overrides,
    }
    return {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "num_query_tokens": 8,
        "image_token_index": tok.token_to_id(IMAGE_TOKEN),
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
        },
        "qformer_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
            "layer_norm_eps": 1e-12,
        },
        "text_config": text,
    }


def random_state_dict(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face names, scaled so that logits are far from flat."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if name.endswith("lm_head.weight"):
            continue  # tied
        is_norm_weight = "LayerNorm.weight" in name or "layer_norm" in name or "layernorm" in name
        if is_norm_weight and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            out[name] = std * torch.randn(p.shape, generator=gen)
    return out


def _to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split our fused OPT qkv_proj back into the checkpoint's q_proj / k_proj / v_proj."""
    out = {}
    for name, t in state.items():
        if ".self_attn.qkv_proj." in name:
            for part, piece in zip("qkv", t.chunk(3, dim=0), strict=True):
                out[name.replace("qkv_proj", f"{part}_proj")] = piece.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def write_tiny_checkpoint(root: str | Path, seed: int = 0, **text_overrides: Any) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and preprocessor_config.json to `root`."""
    from ..arch.blip2 import Blip2ForConditionalGeneration
    from .config import Blip2Config

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    raw = tiny_config(tok, **text_overrides)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config.from_dict(raw))
    state = _to_hf_names(random_state_dict(model, seed))
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    tok.save(str(root / "tokenizer.json"))
    preprocessor = {"size": {"height": 224, "width": 224}, "do_resize": True, "resample": 3}
    (root / "preprocessor_config.json").write_text(json.dumps(preprocessor), encoding="utf-8")
    return root
