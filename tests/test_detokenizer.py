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
from model.data.tokenizer import TextTokenizer
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
    # The reference: the engine's stop check, a full decode after every token.
    end = next(
        (k for k in range(1, len(tokens) + 1) if cut_at_stop(tok.decode(tokens[:k], prompt), stop)[1]), None
    )
    want_tokens = tokens[: end or len(tokens)]
    want_text, stopped = cut_at_stop(tok.decode(want_tokens, prompt), stop)

    out, sent = OutputText(tok, prompt, stop, cut=True), []
    for chunk in _split(tokens, chunks):
        out.add(TokenOutput(chunk, None, [TokenLogprob(t, -1.0, ()) for t in chunk]))
        delta = out.update(0, final=False).text
        assert "\ufffd" not in delta or "\ufffd" in want_text
        sent.append(delta)
        assert want_text.startswith("".join(sent))
    if not out.stopped_here:
        out.finish_reason = "length"
    sent.append(out.update(0, final=True).text)
    assert out.tokens == want_tokens and [lp.token for lp in out.logprobs] == want_tokens
    assert out.text == want_text == "".join(sent)
    assert out.stopped_here is stopped and out.finish_reason == ("stop" if stopped else "length")


def test_beam_hypotheses_keep_their_tokens_and_lose_their_text_after_a_stop_string():
    tok = TOKENIZERS["opt"]
    ids = tok.encode("a cat on a couch")[1:]
    text = RequestText(tok, [2], SamplingParams(num_beams=2, n=2, stop=("on",)))
    updates = text.finish([TokenOutput(ids, "length"), TokenOutput(ids[:2], "stop")])
    assert [u.text for u in updates] == ["a cat ", "a cat"]
    assert [o.tokens for o in text.token_outputs()] == [ids, ids[:2]]
    assert [o.finish_reason for o in text.token_outputs()] == ["stop", "stop"]


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
