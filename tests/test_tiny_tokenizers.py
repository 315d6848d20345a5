"""The tiny checkpoints' trained tokenizers are the same in every process (a test checkpoint written
in one process must tokenize as one written in another: ids are compared across runs and workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

TRAIN = """
import json, sys, tempfile
from pathlib import Path
from oracle import write_t5_tokenizer
from oracle_blip import bert_tokenizer
from model.checkpoint.tiny import train_tokenizer
with tempfile.TemporaryDirectory() as tmp:
    unigram = json.loads((write_t5_tokenizer(Path(tmp)) / "tokenizer.json").read_text())["model"]["vocab"]
vocabs = {"wordpiece": bert_tokenizer().get_vocab(), "bpe": train_tokenizer().get_vocab(), "unigram": unigram}
print(json.dumps(vocabs))
"""


def trained_in_a_new_process(seed: str) -> dict[str, dict[str, int]]:
    # PYTHONHASHSEED varies Python's hashing too; the library's own hash maps are seeded per process.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
        "PYTHONHASHSEED": seed,
    }
    out = subprocess.run(
        [sys.executable, "-c", TRAIN], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_wordpiece_bpe_and_unigram_vocabularies_are_the_same_in_two_processes():
    first, second = trained_in_a_new_process("1"), trained_in_a_new_process("2")
    assert first["wordpiece"] == second["wordpiece"]
    assert first["bpe"] == second["bpe"]
    assert first["unigram"] == second["unigram"]  # Flan-T5's kind: pieces with their scores, in order
    # A real WordPiece vocabulary: word-initial pieces, `##` continuations, BLIP's added tokens.
    vocab = first["wordpiece"]
    assert {"[CLS]", "[SEP]", "[DEC]", "a", "##a", "photo"} <= vocab.keys()
