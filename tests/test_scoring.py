"""Scoring given candidates (`candidates` on /caption and /vqa): the log-probabilities of each candidate's
tokens against transformers' forward pass on every generative family (fp32, CPU), the tokenization rule,
one vision pass and one prefill per step, and the HTTP API (thread and process engines)."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
import torch
from conftest import random_pixels
from live import b64, png_bytes, serve_in_thread
from oracle_blip import IMAGE_SIZE, hf_tokenizer
from PIL import Image

from batching.engine_process import request_from_message
from batching.protocol import Done, add_message, decode_from_engine, decode_to_engine, encode, pixels_of
from model import Blip2Engine
from model.checkpoint.tiny import write_tiny_checkpoint
from model.frontend import Frontend
from model.request_checks import RequestGuard
from model.runtime.plan import ScoringOutput, ScoringRequest, ScoringWork, StepPlan
from server.service import Service
from server.settings import Settings

CANDIDATES = ["a cat", "two dogs playing in the snow", "red", "on the street", "a"]
QUESTION = "Question: what is in the picture? Answer:"
# family -> (checkpoint variant, the prompt that is not None, image side)
FAMILIES = {
    "opt": ("pre_ln", QUESTION, 56),
    "opt_post_ln": ("post_ln", QUESTION, 56),
    "t5": ("t5", QUESTION, 56),
    "blip_vqa": ("blip_vqa", "what is in the picture?", IMAGE_SIZE),
    "blip_caption": ("blip_caption", "a photo of", IMAGE_SIZE),
}


@pytest.fixture(scope="module")
def family(request, checkpoints):
    variant, prompt, side = FAMILIES[request.param]
    root, hf = checkpoints(variant)
    return request.param, Blip2Engine.from_pretrained(str(root)), hf, prompt, side


def hf_logprobs(
    name: str, engine: Blip2Engine, hf, pixels: torch.Tensor, text_ids: list[int], cand: list[int]
):
    """Each candidate token's log-probability from transformers' forward pass over prompt + candidate."""
    cfg = engine.cfg
    with torch.no_grad():
        if name.startswith("opt"):
            ids = [cfg.image_token_index] * cfg.num_query_tokens + text_ids
            logits = hf(pixel_values=pixels[None], input_ids=torch.tensor([ids + cand])).logits[0]
            logits = logits[len(ids) - 1 :]
        elif name == "t5":
            ids = [cfg.image_token_index] * cfg.num_query_tokens + text_ids
            dec = torch.tensor([[cfg.text.decoder_start_token_id, *cand[:-1]]])
            logits = hf(
                pixel_values=pixels[None], input_ids=torch.tensor([ids]), decoder_input_ids=dec
            ).logits[0]
        elif name == "blip_vqa":
            image = hf.vision_model(pixel_values=pixels[None]).last_hidden_state
            question = hf.text_encoder(input_ids=torch.tensor([text_ids]), encoder_hidden_states=image)
            dec = torch.tensor([[cfg.text.bos_token_id, *cand[:-1]]])
            logits = hf.text_decoder(input_ids=dec, encoder_hidden_states=question.last_hidden_state).logits[
                0
            ]
        else:  # blip_caption: [DEC] + prefix + candidate
            ids = torch.tensor([text_ids + cand])
            logits = hf(pixel_values=pixels[None], input_ids=ids).logits[0][len(text_ids) - 1 :]
    lp = logits.float().log_softmax(-1)
    return [lp[j, t].item() for j, t in enumerate(cand)]


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_candidate_logprobs_equal_transformers_forward(family):
    """Two requests (no prompt and a prompt: prefixes of different lengths) in one step, each candidate's
    every token against transformers' forward over prompt + candidate."""
    name, engine, hf, prompt, side = family
    pixels = random_pixels(2, size=side, seed=3)
    prompts = [prompt, prompt] if name == "blip_vqa" else [None, prompt]  # BLIP VQA needs a question
    prompts[0] = "where is the man?" if name == "blip_vqa" else None
    requests = [
        engine.scoring_request(p, f"k{i}", pr, CANDIDATES)
        for i, (p, pr) in enumerate(zip(pixels, prompts, strict=True))
    ]
    works = [
        ScoringWork(i, r.image_key, r.text_ids, r.candidates, r.prefix_positions, r.source_positions)
        for i, r in enumerate(requests)
    ]
    images = {r.image_key: r.pixel_values for r in requests}
    out = engine.new_runner(1, 1, embedding_cache_bytes=0).run(StepPlan(images=images, scorings=works))
    assert out.vision_images == 2
    for i, request in enumerate(requests):
        got = out.scorings[i].logprobs
        for cand, lps in zip(request.candidates, got, strict=True):
            ref = hf_logprobs(name, engine, hf, pixels[i], request.text_ids, cand)
            assert lps == pytest.approx(ref, abs=1e-4)


def test_tokenization_rule(checkpoints):
    opt = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    tok = opt.tokenizer
    for cand in ["a cat", "two dogs", " red "]:
        # After a prompt: as the tokenizer splits "prompt candidate"; BOS never repeated, no end token.
        joint, alone = tok.encode(QUESTION + " " + cand.strip()), tok.encode(QUESTION)
        got = opt.scoring_request(random_pixels(1)[0], "k", QUESTION, [cand]).candidates[0]
        assert joint[: len(alone)] == alone and got == joint[len(alone) :]
        # No prompt (captioning): the candidate opens the text, after BOS.
        assert (
            opt.scoring_request(random_pixels(1)[0], "k", None, [cand]).candidates[0]
            == tok.encode(cand.strip())[1:]
        )
    t5 = Blip2Engine.from_pretrained(str(checkpoints("t5")[0]))
    ids = t5.scoring_request(random_pixels(1)[0], "k", QUESTION, ["a cat"]).candidates[0]
    assert ids == [*t5.tokenizer.encode("a cat")[1:], t5.cfg.eos_token_ids[0]]  # tiny T5: BPE with BOS
    root = checkpoints("blip_vqa")[0]
    vqa = Blip2Engine.from_pretrained(str(root))
    ids = vqa.scoring_request(random_pixels(1, size=IMAGE_SIZE)[0], "k", "what?", ["a red bus"]).candidates[0]
    assert ids == hf_tokenizer(root)("a red bus").input_ids[1:]  # BLIP's rank_answer: answer + [SEP]
    root = checkpoints("blip_caption")[0]
    cap = Blip2Engine.from_pretrained(str(root))
    ids = cap.scoring_request(
        random_pixels(1, size=IMAGE_SIZE)[0], "k", "a photo of", ["a red bus"]
    ).candidates[0]
    assert ids == hf_tokenizer(root)("a red bus").input_ids[1:-1]
    with pytest.raises(ValueError, match=r"candidates\[1\]: empty"):
        opt.scoring_request(random_pixels(1)[0], "k", QUESTION, ["a", "  "])
    with pytest.raises(ValueError, match=r"candidates\[0\].*positions"):
        opt.scoring_request(random_pixels(1)[0], "k", QUESTION, ["a cat " * 100])


def test_one_vision_pass_one_prefill_one_candidate_forward(checkpoints):
    """A step's requests share one vision batch, one prefill and one forward of all their candidates."""
    engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    model = engine.model
    calls = {"encode_images": 0, "prefill": 0, "lm": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    model.encode_images = counted("encode_images", model.encode_images)
    model.prefill = counted("prefill", model.prefill)
    model.language_model.forward = counted("lm", model.language_model.forward)
    pixels = random_pixels(3, seed=5)
    prompts = [None, QUESTION, "Question: how many dogs are there? Answer:"]
    requests = [
        engine.scoring_request(p, f"k{i}", pr, CANDIDATES)
        for i, (p, pr) in enumerate(zip(pixels, prompts, strict=True))
    ]
    results = engine.run_scorings(requests, [CANDIDATES] * 3)
    assert calls == {"encode_images": 1, "prefill": 1, "lm": 2}
    # Each request's result equals that of the request scored alone.
    for pv, prompt, result in zip(pixels, prompts, results, strict=True):
        solo = engine.score(pv, prompt, CANDIDATES)
        assert [(c.index, c.tokens) for c in result.candidates] == [
            (c.index, c.tokens) for c in solo.candidates
        ]
        assert [c.logprob for c in result.candidates] == pytest.approx(
            [c.logprob for c in solo.candidates], abs=1e-5
        )


def test_ranked_best_first_with_sum_and_mean(checkpoints):
    engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    result = engine.score(random_pixels(1, seed=2)[0], QUESTION, CANDIDATES)
    logprobs = [c.logprob for c in result.candidates]
    assert logprobs == sorted(logprobs, reverse=True) and result.text == result.candidates[0].text
    assert sorted(c.index for c in result.candidates) == list(range(len(CANDIDATES)))
    for c in result.candidates:
        assert c.text == CANDIDATES[c.index] and c.mean_logprob == pytest.approx(c.logprob / c.tokens)


def test_scoring_requests_cross_the_process_boundary(tmp_path):
    frontend = Frontend.from_dir(write_tiny_checkpoint(tmp_path), "tiny")
    side = frontend.image_processor
    pixels = torch.randn(3, side.height, side.width)
    request = frontend.scoring_request(pixels, "key", "a photo of", ["a cat", "dog"])
    request.priority = -10
    frames = add_message(3, request, None, False)
    msg = decode_to_engine(frames[0])
    assert (msg.text_ids, msg.candidates, msg.task, msg.params) == (
        request.text_ids,
        request.candidates,
        "",
        None,
    )
    guard = RequestGuard(frontend.processor, side.height, side.width, 64, 2)
    build = request_from_message(guard)  # what the engine process makes of it
    got = build(msg, pixels_of(msg, bytearray(frames[1])))
    fields = ("text_ids", "candidates", "prefix_positions", "source_positions")
    assert isinstance(got, ScoringRequest)
    assert [getattr(got, f) for f in fields] == [getattr(request, f) for f in fields]
    assert got.priority == -10
    assert torch.equal(got.pixel_values, pixels)
    msg.candidates = [[7], []]
    with pytest.raises(ValueError, match="candidates"):
        build(msg, pixels)
    done = decode_from_engine(encode(Done(3, "stop", 0.1, scores=ScoringOutput([[-1.5, -0.25], [-3.0]]))))
    assert done.scores == ScoringOutput([[-1.5, -0.25], [-3.0]]) and done.retrieval is None


# HTTP --------------------------------------------------------------------------------------------------


def expected(engine: Blip2Engine, data: bytes, prompt: str | None) -> list[tuple[int, float]]:
    pixels = engine.image_processor.preprocess(Image.open(io.BytesIO(data)))
    return [(c.index, c.logprob) for c in engine.score(pixels, prompt, CANDIDATES).candidates]


def ranked(candidates: list[dict]) -> list[tuple[int, float]]:
    return [(c["index"], c["logprob"]) for c in candidates]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [i for i, _ in got] == [i for i, _ in want] and [v for _, v in got] == pytest.approx(
        [v for _, v in want], abs=1e-4
    )


@pytest.fixture(scope="module")
def opt_server(checkpoints):
    root = checkpoints("pre_ln")[0]
    settings = Settings(
        model=str(root),
        device="cpu",
        dtype="float32",
        engine="thread",
        max_wait_ms=0,
        max_candidates=6,
        max_new_tokens_limit=20,
    )
    with serve_in_thread(settings) as url:
        yield url, Blip2Engine.from_pretrained(str(root))


def test_vqa_and_caption_with_candidates_over_http(opt_server):
    url, engine = opt_server
    data = png_bytes(1)
    r = httpx.post(
        url + "/vqa",
        json={"image": b64(data), "question": "what is in the picture?", "candidates": CANDIDATES},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "candidates" and body["usage"]["completion_tokens"] == 0
    assert same(ranked(body["candidates"]), expected(engine, data, QUESTION))
    assert body["answer"] == body["candidates"][0]["text"] == CANDIDATES[body["candidates"][0]["index"]]
    # Multipart: repeated `candidates` fields; /caption scores them as captions (no prompt).
    r = httpx.post(
        url + "/caption", data={"candidates": CANDIDATES}, files={"image": ("a.png", data, "image/png")}
    )
    assert r.status_code == 200, r.text
    assert same(ranked(r.json()["candidates"]), expected(engine, data, None))
    # Batch form: every image gets every candidate, each equal to its solo score.
    blobs = [png_bytes(2), png_bytes(3)]
    r = httpx.post(
        url + "/vqa",
        json={
            "images": [b64(b) for b in blobs],
            "question": "what is in the picture?",
            "candidates": CANDIDATES,
        },
    )
    assert r.status_code == 200, r.text
    for item, blob in zip(r.json()["answers"], blobs, strict=True):
        assert item["finish_reason"] == "candidates" and same(
            ranked(item["candidates"]), expected(engine, blob, QUESTION)
        )


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"candidates": []}, "candidates"),
        ({"candidates": "a cat"}, "candidates"),
        ({"candidates": ["a cat", 3]}, "candidates"),
        ({"candidates": ["a cat", " "]}, "candidates: each must be 1 to 4000 characters and not blank; [1]"),
        ({"candidates": ["a"] * 7}, "candidates"),  # max_candidates is 6 here
        ({"candidates": ["a", "a cat " * 15]}, "candidates[1]: 30 tokens, more than this server's 20"),
        ({"candidates": ["a cat " * 70]}, "candidates[0]: the prompt"),  # past the model's positions
        ({"candidates": ["a"], "stream": True}, "stream"),
        ({"candidates": ["a"], "n": 2, "do_sample": True}, "n"),
        ({"candidates": ["a"], "num_beams": 3}, "num_beams"),
        ({"candidates": ["a"], "logprobs": 2}, "logprobs"),
        ({"candidates": ["a"], "question": "cat " * 200}, "question: longer than 128"),  # as sent
        ({"candidates": ["a"], "question": None, "prompt": "cat " * 200}, "prompt: longer than 128"),
    ],
)
def test_bad_candidates_are_a_422_naming_the_field(opt_server, extra, field):
    url, _ = opt_server
    r = httpx.post(url + "/vqa", json={"image": b64(png_bytes(1)), "question": "what?", **extra})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_candidates_are_admitted_by_their_priority(checkpoints):
    """One KV slot, taken by a long caption; two captions wait at the default priority. Candidates sent
    after them at priority 5 are admitted first (scored before the waiting captions start); without
    `priority` they would wait their turn."""
    settings = Settings(
        model=str(checkpoints("pre_ln")[0]),
        device="cpu",
        dtype="float32",
        engine="thread",
        max_wait_ms=0,
        max_running_seqs=1,
    )
    svc = Service.build(settings)
    data = png_bytes(3)

    async def go(url: str) -> list[str]:
        finished: list[str] = []

        async def one(client: httpx.AsyncClient, name: str, body: dict) -> None:
            r = await client.post("/caption", json={"image": b64(data), **body})
            assert r.status_code == 200, r.text
            finished.append(name)

        long = {"max_new_tokens": 20, "min_new_tokens": 20}
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            waiting = [asyncio.ensure_future(one(client, f"caption{i}", long)) for i in range(3)]
            for _ in range(1000):  # one running, two waiting
                if len(svc.lifecycle.scheduler.waiting) == 2 or finished:
                    break
                await asyncio.sleep(0.01)
            assert len(svc.lifecycle.scheduler.waiting) == 2 and not finished
            scored = one(client, "scored", {"candidates": CANDIDATES, "priority": 5})
            await asyncio.gather(*waiting, scored)
        return finished

    with serve_in_thread(settings, svc) as url:
        finished = asyncio.run(go(url))
    assert finished.index("scored") <= 1, finished  # beside or right after the running caption


@pytest.mark.slow  # ~25 s on 2 CPU cores: an engine process starts and warms up
def test_candidates_through_the_engine_process(checkpoints):
    """The default engine (a process of its own), Flan-T5: the same ranking as the offline API, while
    generation requests about the same image run beside it."""
    root = checkpoints("t5")[0]
    engine = Blip2Engine.from_pretrained(str(root))
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_wait_ms=0)
    data = png_bytes(4)
    question = "what is in the picture?"

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            scored = client.post(
                "/vqa", json={"image": b64(data), "question": question, "candidates": CANDIDATES}
            )
            generated = [
                client.post("/vqa", json={"image": b64(data), "question": question}) for _ in range(3)
            ]
            return await asyncio.gather(scored, *generated)

    with serve_in_thread(settings) as url:
        assert settings.engine == "process"
        responses = asyncio.run(burst(url))
    assert [r.status_code for r in responses] == [200] * 4, responses[0].text
    assert all("candidates" not in r.json() for r in responses[1:])
    template = f"Question: {question} Short answer:"
    assert same(ranked(responses[0].json()["candidates"]), expected(engine, data, template))
