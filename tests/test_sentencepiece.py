"""Flan-T5's tokenizer kind (SentencePiece Unigram with Metaspace, `</s>` appended) read from
tokenizer.json: our ids and text equal transformers' T5 tokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.checkpoint.tiny import CORPUS
from model.data.tokenizer import TextTokenizer

SAMPLES = [
    "",
    "Question: what is in the picture? Short answer:",
    "a photo of a cat sitting on a couch",
    "  two   dogs\tplaying  ",
    "naïve café: 3 cats & 2 dogs!",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-tokenizer")
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


def test_ids_and_text_match_transformers(t5_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(t5_dir))
    ours = TextTokenizer.from_dir(t5_dir)
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ids[-1] == 1  # `</s>` closes every Flan-T5 prompt (the empty one is `</s>` alone)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True).strip(), text
    assert ours.encode("") == [1]
    words = ours.decode(ours.encode("a photo of a cat"))
    assert words == "a photo of a cat"
