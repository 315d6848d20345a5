"""The OpenAI-compatible endpoint, driven by the official `openai` client against the live server."""

from __future__ import annotations

import httpx
import openai
import pytest
from live import b64, png_bytes, serve_in_thread

from server.settings import Settings

QUESTION = "what is in the picture?"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def live(checkpoints):
    root, _ = checkpoints("pre_ln")
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_wait_ms=0, api_key=KEY)
    with serve_in_thread(settings) as url:
        yield url, str(root)


@pytest.fixture(scope="module")
def client(live):
    url, _ = live
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def native(live, path: str, **body) -> dict:
    r = httpx.post(live[0] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def user(text: str, data: bytes) -> list[dict]:
    url = "data:image/png;base64," + b64(data)
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def test_models_list(client, live):
    models = client.models.list()
    assert [m.id for m in models.data] == [live[1]]
    assert models.data[0].owned_by == "blipserve"


@pytest.mark.parametrize("text", [QUESTION, ""])
def test_chat_equals_the_native_endpoints(client, live, text):
    data = png_bytes(11)
    chat = client.chat.completions.create(model=live[1], messages=user(text, data), max_tokens=12)
    if text:
        want = native(live, "/vqa", image=b64(data), question=text, max_new_tokens=12)
        assert chat.choices[0].message.content == want["answer"]
    else:
        want = native(live, "/caption", image=b64(data), max_new_tokens=12)
        assert chat.choices[0].message.content == want["caption"]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == want["finish_reason"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streaming_chat(client, live):
    messages = user(QUESTION, png_bytes(12))
    whole = client.chat.completions.create(model=live[1], messages=messages, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model=live[1],
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_logprobs_n_seed_and_stop(client, live):
    data = png_bytes(13)
    chat = client.chat.completions.create(
        model=live[1], messages=user(QUESTION, data), max_tokens=8, logprobs=True, top_logprobs=3
    )
    want = native(live, "/vqa", image=b64(data), question=QUESTION, max_new_tokens=8, logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(
        [e["logprob"] for e in want["choices"][0]["logprobs"]]
    )
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob for e in content)
    assert len(content) == want["usage"]["completion_tokens"] == chat.usage.completion_tokens
    assert all(bytes(e.bytes).decode(errors="replace") == e.token for e in content)

    sampled = dict(model=live[1], messages=user(QUESTION, data), max_tokens=8, n=3, temperature=0.8, seed=7)
    first, again = client.chat.completions.create(**sampled), client.chat.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    want = native(
        live,
        "/vqa",
        image=b64(data),
        question=QUESTION,
        max_new_tokens=8,
        n=3,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        seed=7,
    )
    assert [c.message.content for c in first.choices] == [c["text"] for c in want["choices"]]

    capped = client.chat.completions.create(model=live[1], messages=user("", data), max_tokens=2)
    assert capped.usage.completion_tokens <= 2
    assert capped.choices[0].finish_reason == ("length" if capped.usage.completion_tokens == 2 else "stop")
    free = client.chat.completions.create(model=live[1], messages=user("", data), max_tokens=20)
    stop = free.choices[0].message.content[1:4]
    cut = client.chat.completions.create(model=live[1], messages=user("", data), max_tokens=20, stop=stop)
    assert cut.choices[0].message.content == free.choices[0].message.content.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, error, param",
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
        ({"messages": [{"role": "user", "content": "no image here"}]}, openai.BadRequestError, "messages"),
        ({"top_logprobs": 9, "logprobs": True}, openai.BadRequestError, "top_logprobs"),
        ({"n": 2, "temperature": 0}, openai.BadRequestError, "n"),
        ({"extra_body": {"tools": []}}, openai.BadRequestError, "tools"),
        ({"frequency_penalty": 0.5}, openai.BadRequestError, "frequency_penalty"),
        ({"max_tokens": 100_000}, openai.BadRequestError, "max_tokens"),
        ({"temperature": 1e-300}, openai.BadRequestError, "temperature"),  # sampling overflowed (500)
    ],
)
def test_errors_in_openai_shape(client, live, kwargs, error, param):
    args = {"model": live[1], "messages": user(QUESTION, png_bytes(14)), **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param
    assert info.value.status_code in (400, 404)


def test_auth_and_url_fetching_errors(live):
    url, model = live
    with (
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
            }
        ]
        with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
            c.chat.completions.create(model=model, messages=messages)
