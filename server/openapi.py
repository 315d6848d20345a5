"""The OpenAPI description: request bodies (JSON and multipart), error responses, and the interactive docs
(`/docs`, `/redoc`) served with their JavaScript and CSS from this server, never from a CDN."""

from __future__ import annotations

from importlib.resources import files
from types import MappingProxyType
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from .schemas import ErrorResponse

# What each error status means on this server (the message names the field at fault).
_MEANING = MappingProxyType(
    {
        400: "undecodable image, bad base64, or a model that does not serve this task",
        401: "missing or invalid API key (with --api-key)",
        404: "no such model (`model` is not the served id)",
        413: "request body or image pixel count too large",
        415: "content type other than application/json or multipart/form-data",
        422: "invalid, unknown or repeated field",
        429: "queue full; retry after Retry-After seconds",
        503: "not ready (loading or shutting down); retry after Retry-After seconds",
        504: "request not finished within the server's deadline",
    }
)

NATIVE_STATUSES = (400, 401, 413, 415, 422, 429, 503, 504)
OPENAI_STATUSES = (400, 401, 404, 413, 429, 503, 504)


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, where there is one")
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, for the /v1/ routes (invalid input is a 400 there, as OpenAI answers)."""

    error: OpenAIErrorBody


def errors(statuses: tuple[int, ...] = NATIVE_STATUSES, model: type[BaseModel] = ErrorResponse) -> dict:
    """A route's `responses`: each error status with its meaning and body model."""
    return {code: {"model": model, "description": _MEANING[code]} for code in statuses}


ERRORS = errors()
OPENAI_ERRORS = errors(OPENAI_STATUSES, OpenAIErrorResponse)


def body_doc(model: type[BaseModel], image_required: bool = True) -> dict:
    """A route's `openapi_extra`: the body as JSON (the model; images as base64), or as multipart form
    fields with the images as file parts named `image` (list fields as repeated fields)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    properties = {
        k: v for k, v in model.model_json_schema()["properties"].items() if k not in ("image", "images")
    }
    properties["image"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    form: dict[str, Any] = {"type": "object", "properties": properties}
    if image_required:
        form["required"] = ["image"]
    content = {"application/json": {"schema": ref}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


def add_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the request models into the OpenAPI components that the routes' request bodies reference
    (the routes read their bodies themselves, so FastAPI does not list them)."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# The docs' assets, from the fastapi-offline package (Swagger UI 5 and ReDoc 2, as FastAPI's CDN links).
_ASSETS = MappingProxyType(
    {
        "swagger-ui-bundle.js": "text/javascript",
        "swagger-ui.css": "text/css",
        "redoc.standalone.js": "text/javascript",
        "favicon.png": "image/png",
    }
)

ASSET_PREFIX = "/docs/assets/"
# Served without an API key: the API's description carries no secret.
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json") + tuple(
    ASSET_PREFIX + name for name in _ASSETS
)


def add_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` with their assets served locally: FastAPI's self-hosting recipe
    (https://fastapi.tiangolo.com/how-to/custom-docs-ui-assets/). Build the app with docs_url=None,
    redoc_url=None. URLs are relative to the ASGI root_path, so the pages work behind a path prefix."""
    static = files("fastapi_offline") / "static"

    def local(request: Request, path: str) -> str:
        return request.scope.get("root_path", "") + path

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=local(request, "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=local(request, ASSET_PREFIX + "swagger-ui-bundle.js"),
            swagger_css_url=local(request, ASSET_PREFIX + "swagger-ui.css"),
            swagger_favicon_url=local(request, ASSET_PREFIX + "favicon.png"),
            oauth2_redirect_url=local(request, "/docs/oauth2-redirect"),
            swagger_ui_parameters={"validatorUrl": None},  # no call to swagger.io's validator
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=local(request, "/openapi.json"),
            title=f"{app.title} - ReDoc",
            redoc_js_url=local(request, ASSET_PREFIX + "redoc.standalone.js"),
            redoc_favicon_url=local(request, ASSET_PREFIX + "favicon.png"),
            with_google_fonts=False,
        )

    @app.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in _ASSETS:
            raise HTTPException(404, "Not Found")
        headers = {"cache-control": "max-age=86400"}
        return FileResponse(str(static / name), media_type=_ASSETS[name], headers=headers)
