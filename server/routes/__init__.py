"""The HTTP routes, one `APIRouter` per API family: `native` (/caption, /vqa), `status` (/health,
/ready, /version, /v1/models, /metrics), `openai` (/v1/chat/completions), `embeddings` (/v1/embeddings),
`retrieval` (/match, /embed); `scoring` answers /caption and /vqa's `candidates`, `disconnect` stops work
whose client has gone. `server.app.create_app` includes the routers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from starlette.routing import BaseRoute


def concrete_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Each route that serves a path, the routes of included routers opened up: FastAPI 0.13x+ keeps an
    included `APIRouter` as one entry of `app.routes` (with no `path`), older versions copy its routes."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from concrete_routes(inner.routes)
        else:
            yield route
