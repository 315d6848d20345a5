"""Tokenization with the `tokenizers` library, reproducing the checkpoint's own tokenizer.

`tokenizer.json` is used when present, and its post-processor decides whether BOS (`</s>` for OPT) is
added, as in `transformers` 5. Without one (a `vocab.json` + `merges.txt` checkpoint: byte-level BPE as
OPT's), `add_bos_token` / `add_eos_token` from `tokenizer_config.json` build it, as the slow tokenizer did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """Special tokens are stored either as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted: character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()

# Tokens of context that `TextTokenizer.decode` reads before generated ones: what a token's text adds
# depends on the tokens just before it (a WordPiece `##` joins a word, a SentencePiece `▁` is dropped
# only at the start, byte-level tokens may split a character); vLLM's incremental detokenizer reads 5.
CONTEXT_TOKENS = 8


def text_after(before: str, text: str) -> str:
    """What `text` (the decode of context + new tokens) adds to `before` (the context's decode). Should
    a decoder rewrite the end of the context's text once more follows (a clean-up of spaces across
    tokens), the continuation starts after the part the two texts share."""
    start = len(before) if text.startswith(before) else len(os.path.commonprefix([before, text]))
    return text[start:]


class TextTokenizer:
    """The checkpoint's tokenizer: prompt ids, and the text of generated ids."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None

    @classmethod
    def from_dir(cls, root: str | Path) -> TextTokenizer:
        root = Path(root)
        if (root / "tokenizer.json").exists():
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        elif (root / "vocab.json").exists() and (root / "merges.txt").exists():
            tok = Tokenizer(models.BPE.from_file(str(root / "vocab.json"), str(root / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(f"no tokenizer.json (or vocab.json + merges.txt) in {root}")
        config = {
            **_read_json(root / "special_tokens_map.json"),
            **_read_json(root / "tokenizer_config.json"),
        }
        bos = _token_text(config.get("bos_token"))
        eos = _token_text(config.get("eos_token"))
        if not (root / "tokenizer.json").exists():
            # vocab.json knows no special tokens; register them so that decoding skips them.
            names = ("bos_token", "eos_token", "unk_token", "pad_token")
            tok.add_special_tokens([t for n in names if (t := _token_text(config.get(n))) is not None])
        if tok.post_processor is None:
            cls._template(
                tok,
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
            )
        return cls(tok, bos)

    @staticmethod
    def _template(tok: Tokenizer, bos: str | None, eos: str | None) -> None:
        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def encode(self, text: str) -> list[int]:
        """Prompt ids, with the checkpoint's special tokens (BOS for OPT)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def encode_counted(self, text: str) -> tuple[list[int], int]:
        """`encode(text)` and how many tokens the text itself is (`count`), from one tokenization: the
        text's tokens, then the checkpoint's special tokens added by its post-processor (as `encode`
        does inside `tokenizers`)."""
        plain = self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.post_process(plain, None, True).ids, len(plain.ids)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a character)."""
        if isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            piece = self.tokenizer.id_to_token(token_id) or ""
            return bytes(_BYTE_OF.get(ch, 0x3F) for ch in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def decode(self, ids: list[int], context: Sequence[int] = ()) -> str:
        """Text of `ids` without special tokens, stripped (OPT's stop token is a newline).

        With `context`, the token ids before `ids` (the decoder's prompt), the text that `ids` add to
        it: decode(context + ids) minus decode(context), as vLLM's incremental detokenizer takes it.
        A token's text can depend on the ones before it (WordPiece's `##` joins the previous word,
        SentencePiece's `▁` is dropped at the start, a byte-level BPE token may finish a character),
        so generated tokens decoded alone can begin with `##`. Only the context's last
        `CONTEXT_TOKENS` are decoded: what a token adds depends on its neighbours alone, and the cost
        stays the same whatever the prompt's length."""
        if not context:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        near = list(context[-CONTEXT_TOKENS:])
        before = self.tokenizer.decode(near, skip_special_tokens=True)
        text = self.tokenizer.decode(near + list(ids), skip_special_tokens=True)
        return text_after(before, text).strip()
