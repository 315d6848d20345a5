"""blipserve's own PyTorch BLIP-2: checkpoint loading, image stage, KV-cached OPT decoding."""

from .config import Blip2Config
from .engine import TINY_RANDOM, Blip2Engine, GenerationRequest, GenerationResult
from .generation import SamplingParams

__all__ = [
    "TINY_RANDOM",
    "Blip2Config",
    "Blip2Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
]
