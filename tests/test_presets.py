"""Model presets (configs/*.yaml) serve with their own defaults: beams, VQA template, answer length."""

from __future__ import annotations

import httpx
import pytest
from live import b64, png_bytes, serve_in_thread

from model import Blip2Engine, SamplingParams
from model.data.image import decode_image
from server.settings import load_settings

# preset -> the tiny checkpoint of the same family
FAMILIES = {
    "blip2-flan-t5-xl": "t5",
    "blip2-opt-2.7b": "pre_ln",
    "blip-vqa-base": "blip_vqa",
    "blip-image-captioning-base": "blip_caption",
    "blip2-itm-vit-g": "blip2_itm",
}


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_preset_defaults_are_what_the_server_uses(preset, checkpoints):
    root, _ = checkpoints(FAMILIES[preset])
    settings = load_settings(
        preset, model=str(root), device="cpu", dtype="float32", max_running_seqs=16, engine="thread"
    )
    engine = Blip2Engine.from_pretrained(str(root))
    data = png_bytes(2)
    image = engine.image_processor.preprocess(decode_image(data))
    with serve_in_thread(settings) as url:
        tasks = httpx.get(url + "/v1/models").json()["data"][0]["tasks"]
        assert tasks == list(engine.tasks)
        if "caption" in tasks:
            got = httpx.post(url + "/caption", json={"image": b64(data)}).json()["caption"]
            params = SamplingParams(
                max_new_tokens=settings.default_max_new_tokens, num_beams=settings.default_num_beams
            )
            assert got == engine.generate([image], [None], params)[0].text
        if "vqa" in tasks:
            template = settings.vqa_template or engine.vqa_template
            got = httpx.post(url + "/vqa", json={"image": b64(data), "question": "what is it?"}).json()
            max_new = settings.vqa_max_new_tokens or settings.default_max_new_tokens
            params = SamplingParams(max_new_tokens=max_new, num_beams=settings.default_num_beams)
            prompt = template.format(question="what is it?")
            assert got["answer"] == engine.generate([image], [prompt], params)[0].text
            assert got["usage"]["completion_tokens"] <= max_new
        if "match" in tasks:
            r = httpx.post(url + "/match", json={"image": b64(data), "texts": ["a cat"]})
            assert r.status_code == 200


def test_family_presets_say_what_the_papers_say():
    t5 = load_settings("blip2-flan-t5-xl")
    assert (t5.dtype, t5.default_num_beams, t5.vqa_template) == (
        "bfloat16",
        5,
        "Question: {question} Short answer:",
    )
    assert t5.vqa_max_new_tokens and t5.vqa_max_new_tokens <= 10
    assert load_settings("blip-vqa-base").vqa_template == "{question}"
