"""Image-text matching and embeddings (BLIP-2 and BLIP retrieval checkpoints) against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_pixels
from oracle_blip import BLIP2_IMAGE_SIZE, IMAGE_SIZE, hf_tokenizer

from model import Blip2Engine

TEXTS = ["a photo of a cat", "two dogs playing in the snow on a sunny day", "a red bus"]
SIZES = {"blip2_itm": BLIP2_IMAGE_SIZE, "blip_itm": IMAGE_SIZE}


@pytest.fixture(scope="module", params=["blip2_itm", "blip_itm"])
def retriever(request, checkpoints):
    root, hf = checkpoints(request.param)
    return request.param, Blip2Engine.from_pretrained(str(root)), hf, root


def hf_scores(
    variant: str, hf, pixels: torch.Tensor, ids: list[int]
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """transformers' ITM probability, ITC similarity, image embeddings [Q, D], text embedding [D]."""
    args = {
        "pixel_values": pixels[None],
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids)),
    }
    with torch.no_grad():
        if variant == "blip2_itm":
            itm = hf(**args, use_image_text_matching_head=True).logits_per_image
            out = hf(**args, use_image_text_matching_head=False)
            return (
                itm.softmax(-1)[0, 1].item(),
                out.logits_per_image.item(),
                out.image_embeds[0],
                out.text_embeds[0],
            )
        itm = hf(**args, use_itm_head=True).itm_score
        out = hf(**args, use_itm_head=False)
        image = F.normalize(hf.vision_proj(out.last_hidden_state[:, :1]), dim=-1)[0]
        text = F.normalize(hf.text_proj(out.question_embeds[:, 0]), dim=-1)[0]
        return itm.softmax(-1)[0, 1].item(), out.itm_score.item(), image, text


def test_tokens_match(retriever):
    _, engine, _, root = retriever
    tok = hf_tokenizer(root)
    for text in TEXTS:
        assert engine.processor.retrieval_ids(text) == (tok(text).input_ids, len(tok(text).input_ids) - 2)


def test_match_and_embeddings_equal_transformers(retriever):
    variant, engine, hf, root = retriever
    tok = hf_tokenizer(root)
    pixels = random_pixels(2, size=SIZES[variant], seed=3)
    for pv in pixels:
        # All texts (different lengths: padding) in one batch; transformers one by one.
        ours = engine.match(pv, TEXTS)
        request = engine.retrieval_request("embed", pv, "img", TEXTS)
        embedded = engine.retrieve([request])[0]
        for i, text in enumerate(TEXTS):
            itm, itc, image, text_emb = hf_scores(variant, hf, pv, tok(text).input_ids)
            assert ours.itm[i] == pytest.approx(itm, abs=1e-5)
            assert ours.itc[i] == pytest.approx(itc, abs=1e-5)
            torch.testing.assert_close(
                torch.tensor(embedded.text_embeddings[i]), text_emb, atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(torch.tensor(embedded.image_embedding), image, atol=1e-5, rtol=1e-5)
        assert min(ours.itm) > 0 and max(ours.itm) < 1 and len(set(ours.itc)) == len(TEXTS)


def test_retrieval_model_refuses_generation_and_bad_requests(retriever):
    _, engine, _, _ = retriever
    assert engine.tasks == ("match", "embed")
    with pytest.raises(ValueError, match="at least one text"):
        engine.retrieval_request("match", random_pixels(1, size=8)[0], "k", [])
    with pytest.raises(ValueError, match="tokens"):
        engine.retrieval_request("embed", None, "", ["cat " * 100])
