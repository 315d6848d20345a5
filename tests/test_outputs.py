"""Log-probabilities, several outputs per request and stop strings, against transformers where it has them."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels
from hypothesis import given, settings
from hypothesis import strategies as st

from model import Blip2Engine, SamplingParams
from model.data.detokenizer import OutputText
from model.data.textstream import cut_at_stop
from model.decoding.generation import TokenOutput

PROMPT = "Question: what is in the picture? Answer:"


@pytest.fixture(scope="module")
def pair(checkpoints):
    root, hf = checkpoints("pre_ln")
    return Blip2Engine.from_pretrained(str(root)), hf


def hf_run(engine, hf, pixels: torch.Tensor, prompt: str, **kwargs):
    ids = torch.tensor([engine.prompt_ids(engine.text_ids(prompt))])
    with torch.no_grad():
        out = hf.generate(
            pixel_values=pixels[None],
            input_ids=ids,
            eos_token_id=hf.config.text_config.eos_token_id,
            pad_token_id=1,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    return out, ids.shape[1]


def check_logprobs(entries, scores: list[torch.Tensor], tokens: list[int], k: int) -> None:
    """Each entry: the token's log-softmax of transformers' processed scores, and its top k."""
    assert len(entries) == len(tokens) == len(scores)
    for entry, score, token in zip(entries, scores, tokens, strict=True):
        ref = score.float().log_softmax(-1)
        assert entry.token == token
        assert entry.logprob == pytest.approx(ref[token].item(), abs=1e-4)
        top_lp, top_id = torch.topk(ref, k)
        assert [t for t, _ in entry.top] == top_id.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), top_lp, atol=1e-4, rtol=0)


def test_ruled_out_tokens_are_no_alternatives(pair):
    """top_k=1 leaves one token: its logprob is 0 and no -inf alternatives (JSON has no -inf)."""
    engine, _ = pair
    params = SamplingParams(max_new_tokens=4, do_sample=True, top_k=1, seed=3, logprobs=3)
    result = engine.generate(list(random_pixels(1)), [None], params)[0]
    for entry in result.outputs[0].logprobs:
        assert entry.logprob == 0.0 and entry.top == ((entry.token, 0.0),)


@pytest.mark.parametrize("kwargs", [{}, {"repetition_penalty": 1.4, "min_new_tokens": 4}])
def test_greedy_logprobs_match_output_scores(pair, kwargs):
    engine, hf = pair
    pixels = random_pixels(1, seed=3)[0]
    params = SamplingParams(max_new_tokens=12, logprobs=5, **kwargs)
    ours = engine.generate([pixels], [PROMPT], params)[0]
    out, n = hf_run(engine, hf, pixels, PROMPT, max_new_tokens=12, do_sample=False, **kwargs)
    tokens = out.sequences[0, n:].tolist()
    assert ours.token_ids == tokens
    check_logprobs(ours.outputs[0].logprobs, [s[0] for s in out.scores], tokens, 5)


def test_n_best_beams_match_num_return_sequences(pair):
    engine, hf = pair
    pixels = random_pixels(1, seed=5)[0]
    params = SamplingParams(max_new_tokens=10, num_beams=4, n=3, logprobs=2)
    ours = engine.generate([pixels], [PROMPT], params)[0]
    out, n = hf_run(
        engine, hf, pixels, PROMPT, max_new_tokens=10, num_beams=4, num_return_sequences=3, do_sample=False
    )
    assert len(ours.outputs) == 3
    for i, completion in enumerate(ours.outputs):
        ref = out.sequences[i, n:].tolist()
        got = completion.token_ids
        assert ref[: len(got)] == got and all(t == 1 for t in ref[len(got) :])
        beams = out.beam_indices[i, : len(got)].tolist()
        scores = [out.scores[t][b] for t, b in enumerate(beams)]
        check_logprobs(completion.logprobs, scores, got, 2)
    assert ours.completion_tokens == sum(len(c.token_ids) for c in ours.outputs)


def test_n_samples_share_prefill_and_equal_solo_runs(pair):
    engine, _ = pair
    pixels = random_pixels(1, seed=9)[0]
    many = SamplingParams(max_new_tokens=12, do_sample=True, top_k=0, seed=11, n=4, logprobs=0)
    request = engine.prepare(pixels, PROMPT, many)
    prefill, encode = engine.model.prefill, engine.model.encode_images
    calls = {"prefill": [], "vision": []}
    engine.model.prefill = lambda inputs, *a: calls["prefill"].append(len(inputs)) or prefill(inputs, *a)
    engine.model.encode_images = lambda px: calls["vision"].append(len(px)) or encode(px)
    try:
        together = engine.run_offline([request])[0]
    finally:
        del engine.model.prefill, engine.model.encode_images
    assert calls == {"prefill": [1], "vision": [1]}, "4 samples share one vision pass and one prefill"
    assert len(together.outputs) == 4
    assert len({tuple(c.token_ids) for c in together.outputs}) > 1, "samples should differ"
    for i, completion in enumerate(together.outputs):
        solo = SamplingParams(max_new_tokens=12, do_sample=True, top_k=0, seed=11 + i, logprobs=0)
        alone = engine.generate([pixels], [PROMPT], solo)[0]
        assert completion.token_ids == alone.token_ids
        assert [e.logprob for e in completion.logprobs] == pytest.approx(
            [e.logprob for e in alone.outputs[0].logprobs], abs=1e-5
        )
        assert all(e.logprob <= 0 and e.top == () for e in completion.logprobs)


def test_n_runs_beside_other_requests_unchanged(pair):
    engine, _ = pair
    pixels = list(random_pixels(3, seed=2))
    plist = [
        SamplingParams(max_new_tokens=9),
        SamplingParams(max_new_tokens=9, do_sample=True, seed=4, n=3),
        SamplingParams(max_new_tokens=9, num_beams=3, n=2),
    ]
    together = engine.generate(pixels, [PROMPT] * 3, plist)
    for pv, params, result in zip(pixels, plist, together, strict=True):
        alone = engine.generate([pv], [PROMPT], params)[0]
        assert [c.token_ids for c in result.outputs] == [c.token_ids for c in alone.outputs]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_string_cuts_text_and_ends_early(pair, num_beams):
    engine, _ = pair
    pixels = random_pixels(1, seed=1)[0]
    free = engine.generate([pixels], [PROMPT], SamplingParams(max_new_tokens=20, num_beams=num_beams))[0]
    assert len(free.text) > 6, "the tiny model must say something to cut"
    stop = free.text[3:6]
    params = SamplingParams(max_new_tokens=20, num_beams=num_beams, stop=(stop, "never-said-xyz"), logprobs=1)
    cut = engine.generate([pixels], [PROMPT], params)[0]
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop"
    # Greedy and beams alike end at the first token whose text holds the stop string: a prefix of the
    # free run (the engine knows no stop strings), with its log-probabilities and usage.
    end = next(k for k in range(1, 21) if stop in engine.tokenizer.decode(free.token_ids[:k]))
    assert cut.token_ids == free.token_ids[:end] and end < len(free.token_ids)
    assert [lp.token for lp in cut.outputs[0].logprobs] == cut.token_ids
    assert cut.completion_tokens == end


def test_invalid_output_settings_are_refused():
    with pytest.raises(ValueError, match="n: 3 outputs need do_sample"):
        SamplingParams(n=3)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=6)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=("",))


PIECES = [*"ab cé€🐈\n", "naïve", " the", "日本"]
TEXTS = st.lists(st.sampled_from(PIECES), min_size=1, max_size=20).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, stop=st.lists(st.sampled_from(["e", "🐈", "the", "x y", "€€"]), max_size=2))
def test_stream_deltas_add_up_to_the_final_text(pair, text, stop):
    engine, _ = pair
    tok = engine.tokenizer
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    out, sent = OutputText(tok, [], tuple(stop)), []
    for token in ids:
        out.add(TokenOutput([token], None))
        delta = out.update(0, final=False).text
        assert "\ufffd" not in delta
        sent.append(delta)
    out.close("length")
    sent.append(out.update(0, final=True).text)
    final, stopped = cut_at_stop(tok.decode(out.tokens), tuple(stop))
    assert "".join(sent) == final == out.text
    assert stopped == out.stopped_here  # cut at the token that completed the stop string
    assert not stopped or not cut_at_stop(tok.decode(out.tokens[:-1]), tuple(stop))[1]
