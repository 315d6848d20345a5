"""Generated text decoded after its prompt: what decoding prompt + new tokens adds to decoding the
prompt (transformers' tokenizers as the oracle), for the three tokenizer kinds whose pieces depend on
what precedes them: WordPiece (BLIP, `##`), SentencePiece (Flan-T5, `▁`), byte-level BPE (OPT, a
character split across tokens). Then BLIP conditional captioning and its streamed deltas."""

from __future__ import annotations

import pytest
from conftest import random_pixels
from oracle import hf_continuation as reference
from oracle import write_t5_tokenizer
from oracle_blip import IMAGE_SIZE, hf_tokenizer

from model import Blip2Engine, SamplingParams
from model.data.detokenizer import RequestText
from model.data.tokenizer import CONTEXT_TOKENS, TextTokenizer
from model.decoding.generation import TokenOutput

TEXTS = {
    "blip": [
        "a photography of giraffes, cats and dogs.",
        "two dogs playing in the snowy mountains on a sunnyish day",
    ],
    "opt": [
        "a photo of a café with naïve cats 🐱🐶 on the couch",
        "Question: what is in the picture? Answer: a bowl of fruits — très bien",
    ],
    "t5": [
        "a photo of a cat sitting on a couch next to a remote",
        "Question: how many dogs are there? Short answer: two dogs",
    ],
}


@pytest.fixture(scope="module")
def tokenizers(checkpoints, tmp_path_factory) -> dict[str, tuple[TextTokenizer, object]]:
    """Ours and transformers' tokenizer of each kind, from the same files."""
    roots = {
        "blip": checkpoints("blip_caption")[0],
        "opt": checkpoints("pre_ln")[0],
        "t5": write_t5_tokenizer(tmp_path_factory.mktemp("t5-tok")),
    }
    return {kind: (TextTokenizer.from_dir(root), hf_tokenizer(root)) for kind, root in roots.items()}


@pytest.mark.parametrize("kind", ["blip", "opt", "t5"])
def test_continuations_equal_transformers(tokenizers, kind):
    ours, hf = tokenizers[kind]
    checked = alone_differs = 0
    for text in TEXTS[kind]:
        ids = ours.encode(text)
        for k in range(1, len(ids)):
            context = ids[:k]
            if "\ufffd" in hf.decode(context):
                continue  # a prompt is text: it never ends inside a character
            for end in range(k + 1, len(ids) + 1):
                new = ids[k:end]
                got = ours.decode(new, context)
                assert got == reference(hf, context, new), (kind, context, new)
                checked += 1
                alone_differs += got != ours.decode(new)
    # Long contexts (only their last CONTEXT_TOKENS are read) were checked.
    assert checked > 100 and max(len(ours.encode(t)) for t in TEXTS[kind]) > 2 * CONTEXT_TOKENS
    # Decoded alone, a WordPiece continuation keeps its `##`; the others differ only by a leading
    # space (stripped) or by a character split across the seam (a prompt never ends inside one).
    assert (alone_differs > 0) is (kind == "blip")


def test_wordpiece_continuation_of_a_word(tokenizers):
    ours, hf = tokenizers["blip"]
    context, new = ours.encode("a photography of giraffes")[:-1], []
    # Split inside "photography": the rest of the word comes as `##` pieces.
    split = next(i for i, t in enumerate(context) if ours.tokenizer.id_to_token(t).startswith("##"))
    context, new = context[:split], context[split:]
    assert ours.decode(new).startswith("##")
    assert ours.decode(new, context) == reference(hf, context, new)
    assert not ours.decode(new, context).startswith("#")


@pytest.fixture(scope="module")
def blip(checkpoints):
    root, _ = checkpoints("blip_caption")
    return Blip2Engine.from_pretrained(str(root)), hf_tokenizer(root)


def test_blip_caption_after_a_prompt_has_no_wordpiece_marks(blip):
    """Conditional captioning whose continuation begins with a `##` piece (sampled outputs, so that
    some do): its caption and its streamed deltas are the prompt's continuation."""
    engine, hf = blip
    prompt = "a photography of"
    params = SamplingParams(do_sample=True, temperature=2.0, n=8, seed=1, max_new_tokens=6)
    request = engine.request(random_pixels(1, size=IMAGE_SIZE, seed=3)[0], "k", prompt, params)
    outputs = engine.run_offline([request])[0].outputs
    glued = [o for o in outputs if engine.tokenizer.tokenizer.id_to_token(o.token_ids[0]).startswith("##")]
    assert glued, "no output began with a ## piece: the test would not see the fault"
    for out in outputs:
        assert out.text == reference(hf, request.prompt_ids, out.token_ids)
        assert "#" not in out.text
    # The front end's streaming (`batching.client.EngineClient`): one token of each output per report.
    text = RequestText(engine.tokenizer, request.prompt_ids, params)
    deltas: dict[int, list[str]] = {i: [] for i in range(len(outputs))}
    for step in range(max(len(o.token_ids) for o in outputs)):
        for update in text.add([TokenOutput(o.token_ids[step : step + 1], None) for o in outputs]):
            deltas[update.index].append(update.text)
    for update in text.finish([TokenOutput([], "length") for _ in outputs]):
        deltas[update.index].append(update.text)
    for i, out in enumerate(outputs):
        assert "".join(deltas[i]) == out.text
        assert all("#" not in d for d in deltas[i])
    assert any(deltas[outputs.index(o)][0] for o in glued)  # a first delta was sent, without the ##
