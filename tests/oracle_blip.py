"""Test-only helpers: tiny random BLIP (v1) and BLIP-2 retrieval checkpoints written by `transformers`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from oracle import hf_config, scale_weights
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from model.checkpoint.tiny import CORPUS

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 32  # BLIP's ViT here: patches of 8, so 16 patches + CLS
BLIP2_IMAGE_SIZE = 28  # BLIP-2's ViT here: patches of 14, so 4 patches + CLS

# architecture -> transformers class name
BLIP_ARCHS = {
    "blip_caption": "BlipForConditionalGeneration",
    "blip_vqa": "BlipForQuestionAnswering",
    "blip_itm": "BlipForImageTextRetrieval",
}


def wordpiece_vocab(lines: list[str], vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary learned as `tokenizers`' WordPieceTrainer learns it (BERT's normaliser and
    pre-tokeniser, pieces after a word's first character prefixed `##`, then merges of the most frequent
    adjacent pair), with ties broken by the pieces' text. The library's trainer numbers the `##`
    alphabet in hash-map order, so its ties, and thus its vocabulary, differ from process to process.
    Returns token -> id: the specials, the alphabet (sorted), then the merges in order."""
    normalize = normalizers.BertNormalizer(lowercase=True).normalize_str
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    counts = Counter(word for line in lines for word, _ in split(normalize(line)))
    words = [[w[0], *(f"##{c}" for c in w[1:])] for w in counts]
    vocab = dict.fromkeys([*specials, *sorted({p for pieces in words for p in pieces})])
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for pieces, count in zip(words, counts.values(), strict=True):
            for pair in zip(pieces, pieces[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        vocab[a + b.removeprefix("##")] = None
        for pieces in words:
            i = 0
            while i < len(pieces) - 1:
                if (pieces[i], pieces[i + 1]) == (a, b):
                    pieces[i : i + 2] = [a + b.removeprefix("##")]
                i += 1
    return {token: i for i, token in enumerate(vocab)}


def bert_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """WordPiece laid out as BLIP's: BERT specials, `[CLS] text [SEP]`, then `[DEC]` and `[ENC]` added.
    The same vocabulary in every process (`wordpiece_vocab`)."""
    vocab = wordpiece_vocab(CORPUS.splitlines(), vocab_size, BERT_SPECIALS)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(BERT_SPECIALS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.add_special_tokens(["[DEC]", "[ENC]"])
    return tok


def blip_config(arch: str, tok: Tokenizer):
    from transformers import BlipConfig

    text = {
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": tok.token_to_id("[DEC]"),
        "pad_token_id": tok.token_to_id("[PAD]"),
        "sep_token_id": tok.token_to_id("[SEP]"),
    }
    vision = {
        "hidden_size": 32,  # VQA: the decoder cross-attends to question embeddings through the same widths
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def make_blip_checkpoint(root: Path, variant: str, seed: int = 0):
    """Save a tiny random BLIP (`blip_caption`, `blip_vqa`, `blip_itm`) or BLIP-2 retrieval model
    (`blip2_itm`) with its tokenizer and preprocessor config; return the fp32 transformers model."""
    import transformers

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer()
    if variant == "blip2_itm":
        cfg = hf_config("pre_ln", image_size=BLIP2_IMAGE_SIZE)
        q = cfg.qformer_config
        q.use_qformer_text_input, q.vocab_size, q.max_position_embeddings = True, tok.get_vocab_size(), 64
        cfg.image_token_index, cfg.image_text_hidden_size = None, 16
        hf = transformers.Blip2ForImageTextRetrieval(cfg).eval()
    else:
        hf = getattr(transformers, BLIP_ARCHS[variant])(blip_config(variant, tok)).eval()
    tok.save(str(root / "tokenizer.json"))
    special = {"bos_token": "[DEC]", "pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]"}
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, **special}
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    scale_weights(hf, seed)
    hf.save_pretrained(root)
    side = BLIP2_IMAGE_SIZE if variant == "blip2_itm" else IMAGE_SIZE
    size = {"height": side, "width": side}
    (root / "preprocessor_config.json").write_text(
        json.dumps({"size": size, "resample": 3}), encoding="utf-8"
    )
    return hf


def hf_tokenizer(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


def hf_blip_generate(hf, pixel_values: torch.Tensor, input_ids: list[int] | None, **kwargs: Any) -> list[int]:
    """transformers' BLIP generate for one image; the tokens after the decoder's prompt."""
    ids = torch.tensor([input_ids]) if input_ids is not None else None
    with torch.no_grad():
        if ids is None:
            out = hf.generate(pixel_values=pixel_values[None], do_sample=False, **kwargs)
        else:
            out = hf.generate(pixel_values=pixel_values[None], input_ids=ids, do_sample=False, **kwargs)
    tokens = out[0].tolist()
    if isinstance(hf, __import__("transformers").BlipForQuestionAnswering) or input_ids is None:
        return tokens[1:]  # after [DEC]
    return tokens[len(input_ids) - 1 :]  # the prompt's [SEP] is dropped, [CLS] became [DEC]
