"""The front end's text: a window at a time (`model.data.detokenizer`) gives exactly the full re-decode
(`TextTokenizer.decode(tokens, prompt_ids)`), cut at the token where a stop string first appears as the
engine's stop check cut it, streamed in deltas that add up to it; for the three tokenizer kinds whose
pieces depend on their neighbours: WordPiece (BLIP), SentencePiece (Flan-T5), byte-level BPE (OPT).
Then the engine's side (only new tokens reported) and the client that aborts a request at a stop string."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import write_t5_tokenizer
from oracle_blip import bert_tokenizer
from test_batching import EOS, FakeRequest, FakeRunner
from tokenizers import Tokenizer, models

from batching import EngineCore, Scheduler
from batching.client import InprocClient
from model.checkpoint.tiny import train_tokenizer
from model.data.detokenizer import IncrementalDetokenizer, NewTokens, OutputText, RequestText, unreported
from model.data.textstream import cut_at_stop
from model.data.tokenizer import CONTEXT_TOKENS, TextTokenizer
from model.decoding.generation import SamplingParams, TokenLogprob, TokenOutput


def _tokenizers() -> dict[str, TextTokenizer]:
    with tempfile.TemporaryDirectory() as tmp:
        t5 = TextTokenizer.from_dir(write_t5_tokenizer(Path(tmp)))
    return {"blip": TextTokenizer(bert_tokenizer()), "opt": TextTokenizer(train_tokenizer()), "t5": t5}


TOKENIZERS = _tokenizers()


@st.composite
def generations(draw, kind: str):
    """A prompt (any ids: it may end inside a character), generated ids (special ones included), and
    how the engine's reports split them."""
    vocab = TOKENIZERS[kind].tokenizer.get_vocab_size()
    ids = st.integers(0, vocab - 1)
    prompt = draw(st.lists(ids, max_size=12))
    tokens = draw(st.lists(ids, min_size=1, max_size=24))
    chunks = draw(st.lists(st.integers(1, 4), min_size=len(tokens), max_size=len(tokens)))
    return prompt, tokens, chunks


def _split(tokens: list[int], chunks: list[int]) -> list[list[int]]:
    out, at = [], 0
    for size in chunks:
        if at < len(tokens):
            out.append(tokens[at : at + size])
            at += size
    return out


@pytest.mark.parametrize("kind", ["blip", "opt", "t5"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_window_decoding_equals_the_full_re_decode(kind, data):
    tok = TOKENIZERS[kind]
    prompt, tokens, chunks = data.draw(generations(kind))
    detok, seen = IncrementalDetokenizer(tok, prompt), []
    for chunk in _split(tokens, chunks):
        detok.push(chunk)
        seen += chunk
        assert detok.raw.strip() == tok.decode(seen, prompt)
    # Windows stay short: never a decode from the output's start after the first tokens.
    assert detok.read >= len(detok.ids) - 4 * max(chunks) - 8 or detok.pending


@pytest.mark.parametrize("kind", ["blip", "opt", "t5"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stop_strings_cut_where_the_engine_cut_and_deltas_add_up(kind, data):
    """A stop string taken from the text itself (so that it is met), for one output reported a few
    tokens at a time: tokens cut at the first whose text holds it, the text cut before it, every
    streamed delta whole characters, never more than may be shown."""
    tok = TOKENIZERS[kind]
    prompt, tokens, chunks = data.draw(generations(kind))
    full = tok.decode(tokens, prompt)
    stop: tuple[str, ...] = ()
    if full:
        at = data.draw(st.integers(0, len(full) - 1))
        stop = (full[at : at + data.draw(st.integers(1, 3))], "never said")
    # The reference: a full decode after every token, its complete characters while the output runs
    # (the whole text once it ended), first cut where a stop string shows.
    texts = [_text_so_far(tok, tokens[:k], prompt, final=False) for k in range(1, len(tokens) + 1)]
    end = next((k for k, text in enumerate(texts, 1) if cut_at_stop(text, stop)[1]), None)
    want_tokens = tokens[: end or len(tokens)]
    want_text, stopped = cut_at_stop(tok.decode(want_tokens, prompt), stop)

    out, sent = OutputText(tok, prompt, stop), []
    for chunk in _split(tokens, chunks):
        out.add(TokenOutput(chunk, None, [TokenLogprob(t, -1.0, ()) for t in chunk]))
        delta = out.update(0, final=False).text
        assert "\ufffd" not in delta or "\ufffd" in want_text
        sent.append(delta)
        assert want_text.startswith("".join(sent))
    out.close("length")
    sent.append(out.update(0, final=True).text)
    assert out.tokens == want_tokens and [lp.token for lp in out.logprobs] == want_tokens
    assert out.text == want_text == "".join(sent)
    assert out.stopped_here is (end is not None)
    assert out.finish_reason == ("stop" if stopped else "length")


def _text_so_far(tok: TextTokenizer, tokens: list[int], prompt: list[int], final: bool) -> str:
    """`TextTokenizer.decode`, less the U+FFFD of an unfinished byte sequence unless `final` (the
    decode before stripping ends in one: a U+FFFD before whitespace is a character)."""
    text = tok.decode(tokens, prompt)
    raw = tok.tokenizer.decode(prompt[-CONTEXT_TOKENS:] + tokens, skip_special_tokens=True)
    return text if final or not (text and raw.endswith("\ufffd")) else text[:-1].rstrip()


def test_a_stop_string_never_matches_half_a_character():
    """Byte-level BPE: after the first byte of "뚗" the text so far decodes to "now%\x1c\ufffd"; a
    stop string "\ufffd" must wait for the character (it completes: no stop). It stops at a real
    U+FFFD (the byte 0xFF, complete once the next token shows it is no character's beginning), and an
    output that ends inside a character has that U+FFFD in its final text."""
    tok = TOKENIZERS["opt"]
    words = tok.tokenizer.encode("now%\x1c뚗\x14ayle", add_special_tokens=False).ids
    first_byte = tok.tokenizer.token_to_id("ë")  # 0xEB: "뚗" begins with it
    ff = tok.tokenizer.token_to_id("ÿ")  # the byte 0xFF, never in UTF-8
    stop = ("red", "s\ufffd", "\ufffd")
    assert tok.decode(words[:4], [2]) == "now%\x1c\ufffd"
    cases = [  # tokens, the tokens kept, the text
        (words, words, "now%\x1c뚗\x14ayle"),
        (words + [ff, first_byte] + words[:1], words + [ff, first_byte], "now%\x1c뚗\x14ayle"),
        (words[:4], words[:4], "now%\x1c"),
    ]
    for tokens, kept, text in cases:
        for size in (1, 2, len(tokens)):
            out, sent = OutputText(tok, [2], stop), []
            for at in range(0, len(tokens), size):
                out.add(TokenOutput(tokens[at : at + size], None))
                sent.append(out.update(0, final=False).text)
            out.close("length")
            sent.append(out.update(0, final=True).text)
            assert (out.tokens, out.text, "".join(sent)) == (kept, text, text)
            assert out.finish_reason == (
                "stop" if len(kept) < len(tokens) or "\ufffd" in tok.decode(kept) else "length"
            )


def test_beam_hypotheses_are_cut_at_the_token_of_a_stop_string():
    """Beams come whole at the end: each is cut at the first token whose text holds a stop string, as
    a greedy output is (its tokens and log-probabilities with its text)."""
    tok = TOKENIZERS["opt"]
    ids = tok.encode("a cat on a couch")[1:]
    text = RequestText(tok, [2], SamplingParams(num_beams=2, n=2, stop=("on",)))
    lps = [TokenLogprob(t, -1.0, ()) for t in ids]
    updates = text.finish([TokenOutput(ids, "length", lps), TokenOutput(ids[:2], "stop", lps[:2])])
    on = next(k for k in range(1, len(ids) + 1) if "on" in tok.decode(ids[:k], [2]))
    assert [u.text for u in updates] == ["a cat ", "a cat"]
    assert [o.tokens for o in text.token_outputs()] == [ids[:on], ids[:2]]
    assert [len(o.logprobs) for o in text.token_outputs()] == [on, 2]
    assert [o.finish_reason for o in text.token_outputs()] == ["stop", "stop"]
    assert on < len(ids) and tok.decode(ids[: on - 1], [2]).find("on") < 0


def test_the_engine_reports_each_token_and_each_end_once():
    reported: list[int] = []
    lp = TokenLogprob(7, -0.5, ())
    first = unreported([TokenOutput([7], None, [lp]), TokenOutput([], None, [])], reported)
    assert first == [NewTokens([7], None, [lp]), NewTokens([])]
    assert unreported([TokenOutput([7], None, [lp]), TokenOutput([], None, [])], reported) is None
    second = unreported([TokenOutput([7, 8], "stop", [lp, lp]), TokenOutput([3], None, [lp])], reported)
    assert second == [NewTokens([8], "stop", [lp]), NewTokens([3], None, [lp])]
    third = unreported([TokenOutput([7, 8], "stop", [lp, lp]), TokenOutput([3], "length", [lp])], reported)
    assert third == [NewTokens([]), NewTokens([], "length", [])]
    assert reported == [-1, -1]
    assert (
        unreported([TokenOutput([7, 8], "stop", [lp, lp]), TokenOutput([3], "length", [lp])], reported)
        is None
    )


def _word_tokenizer() -> TextTokenizer:
    """Token i reads "w{i}", words joined by spaces: FakeRunner's tokens 1, 2, 3, ... as text."""
    return TextTokenizer(Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0")))


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_cuts_at_a_stop_string_and_aborts_the_engine(stream):
    """The engine knows no stop strings: the client sees "w5" in the text, answers with the tokens up
    to it, and the engine drops the request long before its 40 tokens."""
    scheduler = Scheduler(2, 4, 4, (EOS,))
    loop = EngineCore(FakeRunner(step_s=0.002), scheduler, max_wait_ms=0)
    ended = []
    client = InprocClient(loop)
    report = loop.on_finished
    loop.on_finished = lambda seqs: (ended.extend(seqs), report(seqs))
    client.use_tokenizer(_word_tokenizer())
    request = FakeRequest(40, params=SamplingParams(max_new_tokens=50, stop=("w5",), logprobs=None))

    async def main():
        client.start()
        ticket = await client.add(request, stream=stream)
        done = await client.wait(ticket)
        updates = []
        while ticket.progress is not None and not ticket.progress.empty():
            updates += ticket.progress.get_nowait()
        for _ in range(200):
            if ended:
                break
            await asyncio.sleep(0.01)
        client.shutdown(10)
        return ticket, done, updates

    ticket, done, updates = asyncio.run(main())
    assert done.finish_reason == "stop" and [o.tokens for o in done.outputs] == [[1, 2, 3, 4, 5]]
    assert ticket.text.texts() == ["w1 w2 w3 w4 "] and done.outputs[0].finish_reason == "stop"
    assert ended[0].finish_reason == "cancelled" and len(ended[0].outputs()[0].tokens) < 40
    if stream:
        assert "".join(u.text for u in updates) == "w1 w2 w3 w4 "
        assert updates[-1].finish_reason == "stop"
