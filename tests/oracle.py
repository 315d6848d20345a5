"""Test-only helpers: tiny random BLIP-2 checkpoints written by `transformers` (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model.checkpoint.tiny import CORPUS, IMAGE_TOKEN, NEWLINE, train_tokenizer

# Architecture variants checked against transformers. Keys are merged into the config.
VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": {},
    "post_ln": {"text": {"do_layer_norm_before": False}},
    # Q-Former cross-attention every other layer, no LM biases, two stop ids, 3 LM layers.
    "sparse_xattn": {
        "qformer": {"cross_attention_frequency": 2, "num_hidden_layers": 3},
        "text": {"enable_bias": False, "num_hidden_layers": 3, "eos_token_id": "both"},
    },
}


# BLIP-2 Flan-T5 in small: gated-GELU, untied lm_head; few relative-position
# buckets so that the prompt spans log-spaced ones. (The tokenizer stays the tiny BPE one.)
T5_TEXT: dict[str, Any] = {
    "model_type": "t5",
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 96,
    "num_layers": 2,
    "num_decoder_layers": 2,  # transformers 5 generate() sizes the cache by num_layers
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "pad_token_id": 1,
}


def hf_config(variant: str = "pre_ln", image_size: int = 56, **text_overrides: Any):
    from transformers import Blip2Config

    tok = train_tokenizer()
    nl = tok.token_to_id(NEWLINE)
    over = VARIANTS.get(variant, {})  # "t5": T5_TEXT below
    text = {
        "model_type": "opt",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 128,
        "max_position_embeddings": 128,
        "word_embed_proj_dim": 64,
        "bos_token_id": 2,
        "pad_token_id": 1,
        "eos_token_id": nl,
        **over.get("text", {}),
        **text_overrides,
    }
    if text["eos_token_id"] == "both":
        text["eos_token_id"] = [nl, 2]
    if variant == "t5":
        text = {**T5_TEXT, "vocab_size": tok.get_vocab_size(), "eos_token_id": nl, **text_overrides}
    qformer = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "cross_attention_frequency": 1,
        **over.get("qformer", {}),
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 14,
    }
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=6,
        image_token_index=tok.token_to_id(IMAGE_TOKEN),
    )


def scale_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Random init is near zero (flat logits, ties everywhere); spread the weights out."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def write_tokenizer_files(root: Path, add_bos_token: bool | None = None) -> None:
    tok = train_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (root / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


def hf_continuation(hf_tokenizer: Any, context: list[int], new: list[int]) -> str:
    """The text of generated ids `new` after the decoder's prompt `context`, by transformers' tokenizer:
    decode(context + new) minus decode(context), stripped (as blipserve's texts)."""
    before = hf_tokenizer.decode(context, skip_special_tokens=True)
    after = hf_tokenizer.decode(context + new, skip_special_tokens=True)
    if not after.startswith(before):
        raise AssertionError(
            f"decoding {new} after {context} changed the prompt's text: {before!r}, {after!r}"
        )
    return after[len(before) :].strip()


def write_t5_tokenizer(root: Path) -> Path:
    """Flan-T5's tokenizer kind (SentencePiece Unigram with Metaspace, `</s>` appended), trained on the
    tiny corpus, saved in `root` as tokenizer.json + tokenizer_config.json; returns `root`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    # As the hub's Flan-T5 tokenizer.json: whitespace split, then Metaspace. (Its normaliser is a
    # precompiled SentencePiece charmap, which transformers 5's T5Tokenizer drops; none here.)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # The trainer's scores differ in their last digits from process to process, and the ids with their
    # order: the same vocabulary in every process, ordered by rounded score (specials first, as trained).
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    specials, learned = pieces[:3], sorted((p, round(s, 9)) for p, s in pieces[3:])
    vocab = [tuple(x) for x in specials] + sorted(learned, key=lambda x: (-x[1], x[0]))
    tok.model = models.Unigram(vocab, unk_id=2)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def make_checkpoint(
    root: Path,
    variant: str = "pre_ln",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    image_size: int = 56,
    **text_overrides: Any,
):
    """Save a tiny random Blip2ForConditionalGeneration to `root`; return the fp32 HF model."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    hf = Blip2ForConditionalGeneration(hf_config(variant, image_size, **text_overrides)).eval()
    scale_weights(hf, seed)
    root.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if dtype == torch.float32:
        hf.save_pretrained(root, **kwargs)
    else:
        hf.to(dtype).save_pretrained(root, **kwargs)
        hf.float()
    write_tokenizer_files(root)
    size = {"height": image_size, "width": image_size}
    (root / "preprocessor_config.json").write_text(
        json.dumps({"size": size, "resample": 3}), encoding="utf-8"
    )
    return hf


def hf_generate(hf, pixel_values: torch.Tensor, input_ids: list[int] | None, **kwargs: Any) -> list[int]:
    """transformers' generate for one image; returns the new tokens only (OPT or Flan-T5)."""
    ids = torch.tensor([input_ids]) if input_ids is not None else None
    eos = kwargs.pop("eos_token_id", hf.config.text_config.eos_token_id)
    with torch.no_grad():
        out = hf.generate(
            pixel_values=pixel_values[None],
            input_ids=ids,
            eos_token_id=eos,
            pad_token_id=1,
            do_sample=False,
            **kwargs,
        )
    if hf.config.text_config.is_encoder_decoder:
        return out[0].tolist()[1:]  # the decoder's output, after its start token
    prompt_len = len(input_ids) if input_ids is not None else hf.config.num_query_tokens + 1
    return out[0].tolist()[prompt_len:]
