"""blipserve's own PyTorch BLIP-2: checkpoint loading, image stage, KV-cached OPT decoding.

Names are imported lazily so that `batching/` can use `model.runtime.plan` and `model.decoding.generation` (plain data
and token bookkeeping) without loading any layer code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Blip2Config": "model.checkpoint.config",
    "Blip2Engine": "model.engine",
    "GenerationRequest": "model.engine",
    "GenerationResult": "model.engine",
    "TINY_RANDOM": "model.engine",
    "SamplingParams": "model.decoding.generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
