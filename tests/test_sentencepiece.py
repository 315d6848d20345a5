"""Flan-T5's tokenizer kind (SentencePiece Unigram with Metaspace, `</s>` appended) read from
tokenizer.json: our ids and text equal transformers' T5 tokenizer."""

from __future__ import annotations

import pytest
from oracle import write_t5_tokenizer

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
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5-tokenizer"))


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
