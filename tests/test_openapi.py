"""The OpenAPI description and the interactive docs: every route's request body and error responses, and
/docs and /redoc working without internet (their assets served by this server). No model is loaded: the
schema, the docs and the body-size errors answer before any route needs one."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.openapi import OpenAIErrorResponse
from server.schemas import ErrorResponse
from server.settings import Settings

NATIVE = ("/caption", "/vqa", "/match", "/embed")
ERROR_STATUSES = {"400", "413", "415", "422", "429", "503", "504"}


@pytest.fixture(scope="module")
def client():
    # Not entered as a context manager: the lifespan (which loads the model) does not run.
    return TestClient(create_app(Settings(api_key="k", auth_docs=False, max_body_mb=0.001)))  # --no-auth-docs


@pytest.fixture(scope="module")
def schema(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/caption", "CaptionRequest"),
        ("/vqa", "VQARequest"),
        ("/match", "MatchRequest"),
        ("/embed", "EmbedRequest"),
    ],
)
def test_native_routes_document_their_bodies(schema, path, model):
    body = schema["paths"][path]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert set(schema["components"]["schemas"][model]["properties"]) >= {"image", "images"}
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["items"]["format"] == "binary"
    assert ("image" in form.get("required", [])) == (path != "/embed")  # /embed takes texts alone
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert chat["schema"] == {"$ref": "#/components/schemas/ChatRequest"}


def test_error_responses_are_listed_with_their_model(schema):
    for path in NATIVE:
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses) >= ERROR_STATUSES | {"401"}, path
        for status in ERROR_STATUSES:
            content = responses[status]["content"]["application/json"]["schema"]
            assert (
                content == {"$ref": "#/components/schemas/ErrorResponse"} and responses[status]["description"]
            )
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) >= {"400", "401", "404", "413", "429", "503", "504"}
    assert chat["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorResponse"
    }
    assert "503" in schema["paths"]["/ready"]["get"]["responses"]


def test_listed_error_models_are_the_bodies_sent(client):
    """The documented models describe what the routes answer (here a 413, sent before any model work)."""
    big = b"x" * 2000
    headers = {"content-type": "application/json", "authorization": "Bearer k"}
    native = client.post("/caption", content=big, headers=headers)
    assert native.status_code == 413 and ErrorResponse.model_validate(native.json())
    openai = client.post("/v1/chat/completions", content=big, headers=headers)
    assert openai.status_code == 413 and OpenAIErrorResponse.model_validate(openai.json())
    assert openai.json()["error"]["param"] is None


@pytest.mark.parametrize(("page", "assets"), [("/docs", 3), ("/redoc", 2)])
def test_docs_pages_load_only_local_assets_without_an_api_key(client, page, assets):
    r = client.get(page)  # no key: the docs stay open with --api-key --no-auth-docs
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    urls += re.findall(r"""url: ?['"]([^'"]+)['"]""", r.text)
    assert len(urls) >= assets and "http" not in r.text.replace("http-equiv", ""), urls
    for url in urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert (
                asset.headers["content-type"].startswith("text/javascript") and len(asset.content) > 500_000
            )
        elif url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css") and len(asset.content) > 50_000
    key = {"authorization": "Bearer k"}  # other paths need the key; then only the assets exist there
    assert client.get("/docs/assets/index.html").status_code == 401
    assert client.get("/docs/assets/index.html", headers=key).status_code == 404
    assert client.get("/docs/assets/%2e%2e%2fsettings.py", headers=key).status_code == 404
    assert client.post("/caption", json={}).status_code == 401  # the API itself still needs the key


def test_docs_follow_the_root_path():
    client = TestClient(create_app(Settings()), root_path="/blip")
    html = client.get("/docs").text
    assert "/blip/docs/assets/swagger-ui-bundle.js" in html and "/blip/openapi.json" in html
