"""A request's images made ready for the engine: fetched (URLs), decoded, preprocessed and hashed in a
worker pool, within this server's limits (items per request, pixels)."""

from __future__ import annotations

import asyncio
import hashlib
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from PIL import Image

from model.data.image import ImageProcessor, to_rgb

from .errors import ApiError, Names, named
from .fetch import fetch_field
from .inputs import Prepared, prepare_image
from .rules import limit_items
from .settings import Settings
from .tracing import Tracing

T = TypeVar("T")


class ImagePrep:
    """Fetch, decode, preprocess and hash images in a pool of 4 worker threads (`pool`). `raw_pixels`
    (set once the engine's device is known): resized uint8 pixels, which the engine normalises.
    `tracing`: each request's preparation is a "preprocess" span."""

    def __init__(self, settings: Settings, processor: ImageProcessor):
        # PIL's own decompression-bomb limit as an error, never just a warning (our pixel cap comes first).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        self.settings = settings
        self.processor = processor
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blipserve-img")
        self.raw_pixels = False
        self.tracing: Tracing | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in the worker pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def fetch(self, item: bytes | str, field: str = "image") -> bytes:
        """The image's bytes: `item` itself, or fetched from its URL (`field`: where the user sent it)."""
        return item if isinstance(item, bytes) else await fetch_field(item, field, self.settings)

    def decode(self, data: bytes, field: str = "image") -> Prepared:
        """Decode and preprocess one image's bytes (blocking: run it in the pool); 400 / 413 naming
        `field` when it is not an image or has more than `max_image_pixels` pixels."""
        return prepare_image(data, self.processor, self.settings.max_image_pixels, field, self.raw_pixels)

    def decode_array(self, array: np.ndarray) -> Prepared:
        """Decoded pixels as an image: uint8 [H, W] or [H, W, C] (Ray Data's `read_images`), keyed by the
        hash of its bytes; 400 for another dtype or shape."""
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ApiError(400, f"image: an array must be uint8 [H, W(, C)], not {array.dtype} {array.shape}")
        try:
            image = to_rgb(Image.fromarray(array))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"image: {exc}") from None
        pixels = self.processor.rgb(image) if self.raw_pixels else self.processor.preprocess(image)
        return Prepared(pixels, hashlib.sha256(array.tobytes()).hexdigest())

    async def prepare(
        self, items: list[bytes | str], fields: list[str] | None = None, names: Names | None = None
    ) -> list[Prepared]:
        """Fetch, decode and preprocess a request's images in the worker pool; `fields`: each image's
        field as sent, `names`: the route's names for ours (for the errors). Traced as "preprocess"."""
        if self.tracing is None:
            return await self._prepare(items, fields, names)
        with self.tracing.span("preprocess"):
            prepared = await self._prepare(items, fields, names)
        self.tracing.record_images([p.size for p in prepared])
        return prepared

    async def _prepare(
        self, items: list[bytes | str], fields: list[str] | None, names: Names | None
    ) -> list[Prepared]:
        limit_items(len(items), named("images", names), self.settings)
        fields = fields or [f"images[{i}]" if len(items) > 1 else "image" for i in range(len(items))]
        blobs = await asyncio.gather(
            *(self.fetch(item, field) for item, field in zip(items, fields, strict=True))
        )
        jobs = [self.run(self.decode, data, field) for field, data in zip(fields, blobs, strict=True)]
        return list(await asyncio.gather(*jobs))

    def close(self) -> None:
        """Stop the pool; images not yet decoded are dropped."""
        self.pool.shutdown(wait=False, cancel_futures=True)
