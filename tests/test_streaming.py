"""Native endpoints over HTTP: streaming (SSE), logprobs, n outputs and stop strings."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from live import b64, png_bytes, serve_in_thread
from test_server import gated_service

from model import Blip2Engine, SamplingParams
from server.settings import Settings

QUESTION = "what is in the picture?"
TEMPLATE = "Question: {question} Answer:"


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return checkpoints("pre_ln")


@pytest.fixture(scope="module")
def engine(ckpt):
    return Blip2Engine.from_pretrained(str(ckpt[0]))


@pytest.fixture(scope="module")
def served(ckpt):
    settings = Settings(model=str(ckpt[0]), device="cpu", dtype="float32", max_running_seqs=8, max_wait_ms=0)
    holder: dict = {}
    with serve_in_thread(settings) as url:
        holder["url"] = url
        yield holder


def events(response: httpx.Response) -> list[dict]:
    """The JSON of each `data:` line of an SSE body."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def stream(url: str, path: str, body: dict) -> tuple[httpx.Response, list[dict]]:
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        assert r.headers["content-type"].startswith("text/event-stream")
        return r, events(r)


def test_stream_deltas_add_up_to_the_plain_answer(served, engine):
    url, image = served["url"], b64(png_bytes(1))
    body = {"image": image, "question": QUESTION, "max_new_tokens": 20, "min_new_tokens": 12}
    plain = httpx.post(url + "/vqa", json=body, timeout=60).json()
    r, evs = stream(url, "/vqa", {**body, "stream": True})
    deltas, final = evs[:-1], evs[-1]
    assert len(deltas) > 1, "one event per delta, not one at the end"
    assert all(e["index"] == 0 and e["text"] for e in deltas)
    assert "".join(e["text"] for e in deltas) == plain["answer"] == final["choices"][0]["text"]
    assert final["done"] is True and final["finish_reason"] == plain["finish_reason"]
    assert final["usage"] == plain["usage"]


def test_stream_never_splits_a_character(served, engine):
    """A prompt ending mid-word in a multibyte script: whatever the tiny model emits, each event's text is
    whole characters (JSON would carry a lone surrogate or U+FFFD otherwise) and adds up to the answer."""
    url = served["url"]
    body = {"image": b64(png_bytes(2)), "prompt": "日本 🐈", "max_new_tokens": 30, "min_new_tokens": 30}
    body.update(do_sample=True, seed=3, temperature=2.0, top_k=0)
    plain = httpx.post(url + "/caption", json=body, timeout=60).json()
    _, evs = stream(url, "/caption", {**body, "stream": True})
    text = "".join(e.get("text", "") for e in evs[:-1])
    assert "\ufffd" not in text or "\ufffd" in plain["caption"]
    assert text == plain["caption"]


def test_stream_with_logprobs_and_n(served):
    url = served["url"]
    body = {"image": b64(png_bytes(3)), "max_new_tokens": 8, "do_sample": True, "seed": 5, "n": 3}
    body["logprobs"] = 2
    plain = httpx.post(url + "/caption", json=body, timeout=60).json()
    _, evs = stream(url, "/caption", {**body, "stream": True})
    final = evs[-1]
    for i, choice in enumerate(plain["choices"]):
        mine = [e for e in evs[:-1] if e["index"] == i]
        assert "".join(e["text"] for e in mine) == choice["text"] == final["choices"][i]["text"]
        streamed = [lp for e in mine for lp in e["logprobs"]]
        assert streamed == choice["logprobs"]
        assert all(len(lp["top"]) == 2 for lp in streamed)


def test_logprobs_and_n_in_plain_replies(served, engine, ckpt):
    url, data = served["url"], png_bytes(4)
    body = {
        "image": b64(data),
        "question": QUESTION,
        "max_new_tokens": 6,
        "num_beams": 3,
        "n": 2,
        "logprobs": 1,
    }
    r = httpx.post(url + "/vqa", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    want = engine.generate(
        [engine.image_processor.preprocess(_image(data))],
        [TEMPLATE.format(question=QUESTION)],
        SamplingParams(max_new_tokens=6, num_beams=3, n=2, logprobs=1),
    )[0]
    assert [c["text"] for c in got["choices"]] == [c.text for c in want.outputs]
    assert got["answer"] == want.outputs[0].text
    for choice, completion in zip(got["choices"], want.outputs, strict=True):
        assert [lp["id"] for lp in choice["logprobs"]] == completion.token_ids
        assert [lp["logprob"] for lp in choice["logprobs"]] == pytest.approx(
            [e.logprob for e in completion.logprobs]
        )
    assert got["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in want.outputs)
    batch = {"images": [b64(data)] * 2, "question": QUESTION, "max_new_tokens": 6, "n": 2, "num_beams": 2}
    items = httpx.post(url + "/vqa", json=batch, timeout=60).json()["answers"]
    assert all(len(item["choices"]) == 2 for item in items)


def test_stop_strings_over_http(served):
    url, image = served["url"], b64(png_bytes(5))
    free = httpx.post(url + "/caption", json={"image": image, "max_new_tokens": 20}, timeout=60).json()
    stop = free["caption"][2:5]
    body = {"image": image, "max_new_tokens": 20, "stop": [stop]}
    cut = httpx.post(url + "/caption", json=body, timeout=60).json()
    assert cut["caption"] == free["caption"][: free["caption"].index(stop)]
    assert cut["finish_reason"] == "stop"
    _, evs = stream(url, "/caption", {**body, "stream": True})
    assert "".join(e.get("text", "") for e in evs[:-1]) == cut["caption"]
    assert evs[-1]["finish_reason"] == "stop"
    files = {"image": ("a.png", png_bytes(5), "image/png")}
    form = {"max_new_tokens": "20", "stop": [stop, "zzz"]}
    multipart = httpx.post(url + "/caption", data=form, files=files, timeout=60).json()
    assert multipart["caption"] == cut["caption"]


def test_beams_cut_at_a_stop_string_over_http(served, engine):
    """A beam search's outputs come whole at the end; a stop string cuts their tokens, log-probabilities
    and usage where it cuts the text, as the offline API does."""
    url, data = served["url"], png_bytes(5)
    body = {"image": b64(data), "max_new_tokens": 20, "num_beams": 3, "logprobs": 1}
    free = httpx.post(url + "/caption", json=body, timeout=60).json()
    stop = free["caption"][2:5]
    cut = httpx.post(url + "/caption", json={**body, "stop": [stop]}, timeout=60).json()
    ids = [lp["id"] for lp in free["choices"][0]["logprobs"]]
    end = next(k for k in range(1, 21) if stop in engine.tokenizer.decode(ids[:k]))
    assert cut["caption"] == free["caption"][: free["caption"].index(stop)] and cut["finish_reason"] == "stop"
    assert [lp["id"] for lp in cut["choices"][0]["logprobs"]] == ids[:end] and end < len(ids)
    assert cut["usage"]["completion_tokens"] == end
    want = engine.generate(
        [engine.image_processor.preprocess(_image(data))],
        [None],
        SamplingParams(max_new_tokens=20, num_beams=3, logprobs=1, stop=(stop,)),
    )[0]
    assert want.token_ids == ids[:end] and want.text == cut["caption"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"n": 2}, "n: 2 outputs need do_sample"),
        ({"n": 99, "do_sample": True}, "n: at most 8"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"images": ["x", "y"], "stream": True}, "stream: only for the single form"),
    ],
)
def test_bad_output_settings_are_422(served, body, message):
    image = b64(png_bytes(6))
    payload = {"image": image, **body} if "images" not in body else {**body, "images": [image, image]}
    r = httpx.post(served["url"] + "/caption", json=payload, timeout=60)
    assert r.status_code == 422 and message in r.json()["error"]["message"], r.text


def test_client_leaving_a_stream_frees_its_slot(ckpt):
    svc, gated = gated_service(ckpt, max_running_seqs=2)
    gated.delay = 0.05  # 120 tokens would take 6 s: the slot must come back long before
    with serve_in_thread(svc.settings, svc) as url:
        body = {"image": b64(png_bytes(7)), "max_new_tokens": 120, "min_new_tokens": 120, "stream": True}
        for _ in range(3):  # more streams than slots: each abandoned one must give its slot back
            with httpx.stream("POST", url + "/caption", json=body, timeout=60) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first event: the request holds a slot
                assert svc.lifecycle.scheduler.running
            left = time.monotonic()
            while svc.lifecycle.scheduler.running and time.monotonic() < left + 5:
                time.sleep(0.01)
            assert time.monotonic() - left < 1.0
            assert not svc.lifecycle.scheduler.running and len(svc.lifecycle.scheduler.free_slots) == 2
        gated.delay = 0
        ok = httpx.post(url + "/caption", json={"image": body["image"], "max_new_tokens": 3}, timeout=60)
        assert ok.status_code == 200


def _image(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))
