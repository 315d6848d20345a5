"""Fields as users send them, over HTTP on each route (native JSON, multipart, OpenAI): a question that
carries the VQA template already, the raw `prompt` form, repeated fields, and errors that name the field
the user sent (never one of ours they did not)."""

from __future__ import annotations

import json

import httpx
import pytest
from live import b64, png_bytes, serve_in_thread
from test_server import TEMPLATE, oracle_text

from server.inputs import carries_template, vqa_prompt
from server.settings import Settings

LONG = "is the cat on the left of the big red chair in the picture " * 4  # > 40 tokens
MIDDLE = "what is on the left side of the table in the picture over there?"  # fits, but not with 100 new


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return checkpoints("pre_ln")


@pytest.fixture(scope="module")
def url(ckpt):
    settings = Settings(
        model=str(ckpt[0]),
        device="cpu",
        dtype="float32",
        max_wait_ms=0,
        max_prompt_tokens=40,
        max_new_tokens_limit=100,  # 6 queries + 40 + 100 > the checkpoint's 128 positions
        max_n=3,
        max_items_per_request=3,
        engine="thread",
    )
    with serve_in_thread(settings) as base:
        yield base


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, status: int, starts: str) -> dict:
    """The error body of a refusal whose message starts with `starts` (the field as sent)."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"].startswith(starts), error
    return error


def same_answer(a: dict, b: dict) -> None:
    """Equal output from the same prompt: the text, its log-probabilities and the prompt's token count."""
    assert (a["answer"], a.get("choices"), a["usage"]) == (b["answer"], b.get("choices"), b["usage"])


def form(image: bytes, count: int = 1) -> list:
    return [("image", (f"{i}.png", image, "image/png")) for i in range(count)]


# Item 5: the template is never added twice; /vqa has a raw prompt form.


@pytest.mark.parametrize(
    ("question", "template", "carries"),
    [
        ("Question: what is it? Answer:", TEMPLATE, True),
        ("  question: what is it?   answer: ", TEMPLATE, True),  # without case and outer spaces
        ("Question: what is it? Short answer:", TEMPLATE, True),  # ends with the template's tail
        ("Question: what is it?", TEMPLATE, False),
        ("what is it? Answer:", TEMPLATE, False),
        ("Question: Answer:", "Question: {question} Answer:", True),
        ("Question:Answer:", "Question: {question} Answer:", True),
        ("Question: what is it? Answer:", "{question}", False),  # BLIP: the bare question
        ("Q: what? A:", "Q: {question} A:", True),
        ("Q: what?", "Q: {question}", True),
    ],
)
def test_template_shape_rule(question, template, carries):
    assert carries_template(question, template) is carries
    want = question.strip() if carries else template.format(question=question.strip())
    assert vqa_prompt(question, template) == want


def test_a_question_with_the_template_is_answered_as_the_bare_question(url, ckpt):
    image = png_bytes(21)
    body = {"image": b64(image), "max_new_tokens": 6, "logprobs": 1}
    bare = ok(httpx.post(url + "/vqa", json={**body, "question": "what is it?"}))
    assert bare["answer"] == oracle_text(
        ckpt, image, TEMPLATE.format(question="what is it?"), max_new_tokens=6
    )
    templated = {**body, "question": "Question: what is it? Answer:"}
    same_answer(ok(httpx.post(url + "/vqa", json=templated)), bare)
    raw = {**body, "prompt": "Question: what is it? Answer:"}
    same_answer(ok(httpx.post(url + "/vqa", json=raw)), bare)
    fields = {"prompt": "Question: what is it? Answer:", "max_new_tokens": "6", "logprobs": "1"}
    same_answer(ok(httpx.post(url + "/vqa", files=form(image), data=fields)), bare)
    batch = ok(httpx.post(url + "/vqa", json={**body, "questions": ["what is it?", templated["question"]]}))
    assert batch["answers"][0]["text"] == batch["answers"][1]["text"] == bare["answer"]
    # Another template's shape is sent as it stands; the raw form sends anything as it stands.
    other = "Question: what is it? Short answer:"
    same_answer(
        ok(httpx.post(url + "/vqa", json={**body, "question": other})),
        ok(httpx.post(url + "/vqa", json={**body, "prompt": other})),
    )
    unshaped = ok(httpx.post(url + "/vqa", json={**body, "question": "Question: what is it?"}))
    twice = {**body, "prompt": "Question: Question: what is it? Answer:"}
    same_answer(unshaped, ok(httpx.post(url + "/vqa", json=twice)))
    refused(httpx.post(url + "/vqa", json={**raw, "question": "x"}), 422, "body: give exactly one of")


def test_chat_text_with_the_template_is_answered_as_the_bare_question(url):
    image = "data:image/png;base64," + b64(png_bytes(22))

    def chat(text: str) -> dict:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
        body = {"model": httpx.get(url + "/v1/models").json()["data"][0]["id"], "max_tokens": 6}
        body |= {"messages": [{"role": "user", "content": content}], "logprobs": True}
        return ok(httpx.post(url + "/v1/chat/completions", json=body))

    bare, templated = chat("what is it?"), chat("Question: what is it? Answer:")
    assert templated["choices"] == bare["choices"] and templated["usage"] == bare["usage"]


# Item 13: repeated multipart fields.


def test_repeated_multipart_question_is_several_questions(url):
    image = png_bytes(23)
    questions = ["what is it?", "where is it?"]
    want = ok(
        httpx.post(url + "/vqa", json={"image": b64(image), "questions": questions, "max_new_tokens": 5})
    )
    got = ok(httpx.post(url + "/vqa", files=form(image), data={"question": questions, "max_new_tokens": "5"}))
    assert got["answers"] == want["answers"] and len(got["answers"]) == 2
    # Paired one to one with repeated image parts, as "images" and "questions" are in JSON.
    other = png_bytes(24)
    pairs = {"images": [b64(image), b64(other)], "questions": questions, "max_new_tokens": 5}
    files = [("image", ("a.png", image)), ("image", ("b.png", other))]
    got = ok(httpx.post(url + "/vqa", files=files, data={"question": questions, "max_new_tokens": "5"}))
    assert got["answers"] == ok(httpx.post(url + "/vqa", json=pairs))["answers"]


@pytest.mark.parametrize(
    ("path", "fields", "starts"),
    [
        ("/vqa", {"question": "a?", "max_new_tokens": ["3", "4"]}, "max_new_tokens: given 2 times"),
        ("/caption", {"prompt": ["a photo of", "a picture of"]}, "prompt: given 2 times"),
        ("/vqa", {"prompt": ["Question: a? Answer:"] * 3}, "prompt: given 3 times"),
        ("/vqa", {"question": ["a?", "b?"], "questions": "c?"}, "question: given 2 times"),
        ("/caption", {"seed": ["1", "1"]}, "seed: given 2 times"),
    ],
)
def test_repeated_multipart_scalar_is_refused(url, path, fields, starts):
    refused(httpx.post(url + path, files=form(png_bytes(25)), data=fields), 422, starts)


def test_repeated_json_key_is_refused(url):
    body = json.dumps({"image": b64(png_bytes(26)), "question": "a?"})[:-1] + ', "question": "b?"}'
    headers = {"content-type": "application/json"}
    refused(httpx.post(url + "/vqa", content=body, headers=headers), 422, "question: given more than once")


# Item 14: each error names the field as the user sent it on that route.


@pytest.mark.parametrize(
    ("body", "starts"),
    [
        ({"question": LONG}, "question: longer than 40 tokens"),
        ({"questions": ["a?", LONG]}, "questions[1]: longer than 40 tokens"),
        ({"questions": ["a?", ""]}, "questions[1]: String should have at least 1 character"),
        ({"prompt": LONG}, "prompt: longer than 40 tokens"),
        ({"question": MIDDLE, "max_new_tokens": 100}, "question ("),
        ({"questions": ["a?", "b?", "c?", "d?"]}, "questions: at most 3 per request"),
        ({"question": "a?", "max_new_tokens": 101}, "max_new_tokens: at most 100"),
        ({"question": "a?", "n": 2}, "n: 2 outputs need do_sample or num_beams >= n"),
    ],
)
def test_native_json_errors_name_the_field_sent(url, body, starts):
    error = refused(httpx.post(url + "/vqa", json={"image": b64(png_bytes(27)), **body}), 422, starts)
    if starts == "question (":
        assert "+ max_new_tokens (100)" in error["message"] and "prompt" not in error["message"]


def test_native_json_image_errors_name_the_image(url):
    good, bad = b64(png_bytes(28)), b64(b"GIF89a not an image")
    r = httpx.post(url + "/caption", json={"images": [good, bad]})
    refused(r, 400, "images[1]: not an image")
    refused(httpx.post(url + "/caption", json={"images": [bad, good]}), 400, "images[0]: not an image")
    refused(httpx.post(url + "/caption", json={"image": bad}), 400, "image: not an image")
    refused(httpx.post(url + "/caption", json={"image": good, "prompt": LONG}), 422, "prompt: longer than")
    refused(httpx.post(url + "/caption", json={"images": [good, "@@"]}), 400, "images[1]: not valid base64")


@pytest.mark.parametrize(
    ("images", "fields", "starts"),
    [
        (1, {"question": LONG}, "question: longer than 40 tokens"),
        (1, {"question": ["a?", LONG]}, "question[1]: longer than 40 tokens"),
        (1, {"question": ["a?", ""]}, "question[1]: String should have at least 1 character"),
        (1, {"question": ["a?", "b?", "c?", "d?"]}, "question: at most 3 per request"),
        (2, {"question": ["a?", "b?", "c?"]}, "question: 3 given for 2 images"),
        (4, {"question": "a?"}, "image: at most 3 per request"),
        (1, {"question": MIDDLE, "max_new_tokens": "100"}, "question ("),
        (1, {"prompt": LONG}, "prompt: longer than 40 tokens"),
    ],
)
def test_multipart_errors_name_the_field_sent(url, images, fields, starts):
    refused(httpx.post(url + "/vqa", files=form(png_bytes(29), images), data=fields), 422, starts)


def test_multipart_image_errors_name_the_part(url):
    files = [("image", ("a.png", png_bytes(30))), ("image", ("b.gif", b"GIF89a not an image"))]
    refused(httpx.post(url + "/caption", files=files), 400, "image[1]: not an image")
    refused(httpx.post(url + "/caption", files=files[1:]), 400, "image: not an image")


@pytest.mark.parametrize(
    ("extra", "text", "starts", "param"),
    [
        ({"max_tokens": 101}, "a?", "max_tokens: at most 100", "max_tokens"),
        ({"max_completion_tokens": 101}, "a?", "max_completion_tokens: at most 100", "max_completion_tokens"),
        ({"n": 2, "temperature": 0}, "a?", "n: 2 choices need sampling", "n"),
        ({"n": 4, "temperature": 1}, "a?", "n: at most 3", "n"),
        ({}, LONG, "messages: longer than 40 tokens", "messages"),
        ({"max_tokens": 100}, MIDDLE, "messages (", "messages"),
        ({"top_logprobs": 2, "logprobs": True, "stop": ["x"] * 5}, "a?", "stop:", "stop"),
    ],
)
def test_openai_errors_name_the_field_sent(url, extra, text, starts, param):
    image = "data:image/png;base64," + b64(png_bytes(31))
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    error = refused(httpx.post(url + "/v1/chat/completions", json=body), 400, starts)
    assert error["param"] == param
    for ours in ("max_new_tokens", "do_sample", "num_beams", "prompt"):
        assert ours not in error["message"]


def test_openai_image_and_repeated_key_errors(url):
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    image = "data:image/png;base64," + b64(b"GIF89a not an image")
    content = [{"type": "image_url", "image_url": {"url": image}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    refused(httpx.post(url + "/v1/chat/completions", json=body), 400, "image_url: not an image")
    text = json.dumps(body)[:-1] + ', "max_tokens": 3, "max_tokens": 4}'
    headers = {"content-type": "application/json"}
    error = refused(
        httpx.post(url + "/v1/chat/completions", content=text, headers=headers), 400, "max_tokens: given"
    )
    assert error["param"] == "max_tokens"


# Review of issue 21: every mistake is named as sent, for each kind of value.


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_numbers_that_are_not_finite_are_refused_as_such(url, number):
    """Python's JSON reads NaN and Infinity; they failed a bound's check ('less than or equal to 10')."""
    headers = {"content-type": "application/json"}
    image = b64(png_bytes(32))
    body = f'{{"image": "{image}", "question": "a?", "do_sample": true, "temperature": {number}}}'
    r = httpx.post(url + "/vqa", content=body, headers=headers)
    refused(r, 422, "temperature: Input should be a finite number")
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]
    chat = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]})
    for field in ("temperature", "top_p", "repetition_penalty"):
        text = chat[:-1] + f', "{field}": {number}}}'
        r = httpx.post(url + "/v1/chat/completions", content=text, headers=headers)
        assert refused(r, 400, f"{field}: Input should be a finite number")["param"] == field


@pytest.mark.parametrize(
    ("message", "extra", "starts"),
    [
        (
            {"content": [{"type": "image_url", "image_url": {}}]},
            {},
            "messages[0].content[0].image_url.url: Field",
        ),
        ({"content": [{"type": "audio"}]}, {}, "messages[0].content[0].type: Input should be 'text' or"),
        ({"content": 5}, {}, "messages[0].content: expected a string or a list of content parts"),
        ({"content": "a?"}, {"stop": 5}, "stop: expected a string or a list of strings"),
        ({"content": "a?"}, {"stop": ["a", 5]}, "stop[1]: Input should be a valid string"),
    ],
)
def test_openai_text_or_list_fields_are_checked_as_the_form_sent(url, message, extra, starts):
    """`content` and `stop` take a string or a list: an error points into the form that was sent, not
    into each form pydantic tried (`content.str: ...; content.list[ContentPart][0]...`)."""
    body = {"model": "tiny", "messages": [{"role": "user", **message}], **extra}
    error = refused(httpx.post(url + "/v1/chat/completions", json=body), 400, starts)
    assert error["message"] == starts or ";" not in error["message"], error
    assert error["param"] == starts.split(":")[0]


def test_image_url_errors_name_the_field_and_the_flag(url):
    """URLs where the server fetches none: the field as sent, the flag that would allow them."""
    words = "image URLs are not fetched by this server (started without --allow-image-urls)"
    good = b64(png_bytes(33))
    r = httpx.post(url + "/caption", json={"images": [good, "https://example.com/cat.jpg"]})
    refused(r, 400, f"images[1]: {words}")
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    error = refused(httpx.post(url + "/v1/chat/completions", json=body), 400, f"image_url: {words}")
    assert error["param"] == "image_url"
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]
    body["messages"][0]["content"] = content
    error = refused(httpx.post(url + "/v1/chat/completions", json=body), 400, "image_url: not valid base64")
    assert error["param"] == "image_url"


@pytest.mark.parametrize("path", ["/caption", "/vqa", "/v1/chat/completions"])
@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400_and_the_server_goes_on(url, path, depth):
    """[[[[...]]]]: nested past what any request takes (40), or past the decoder's recursion (100k); it was
    a 500 (RecursionError) at 100k."""
    body = '{"image": ' + "[" * depth + "]" * depth + "}"
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nested deeper than 32 levels" in r.text, r.text
    assert httpx.get(url + "/health").status_code == 200
