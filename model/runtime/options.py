"""How the runner runs: its options, and the checks that decide which fast paths a model can take
(fixed-shape prefill). The decode step's Triton kernels are chosen when the model is built
(`model.kernels.backend`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.family import GenerationModel
from ..arch.kv_cache import KVCache


@dataclass(frozen=True)
class DecodeOptions:
    """How the runner runs decode steps."""

    # The fixed-shape step over slots [0, rows) (`model.runtime.static_decode`); off: rows gathered from their slots.
    static: bool = True
    # Replay that step as CUDA graphs (only on a CUDA device; ignored elsewhere).
    cuda_graphs: bool = True
    # Keys are read up to the next multiple of this many positions (fewer shapes vs less padding).
    kv_step: int = 32
    # With CUDA graphs: the vision stage is captured at batch sizes 1, 2, 4, ... up to this (0: eager).
    vision_batch: int = 0
    # With CUDA graphs: prefills too, at (requests, positions) buckets (OPT-based BLIP-2).
    prefill_graphs: bool = True
    # Offline generate: launch each decode step before reading the last one's tokens when the batch
    # allows it (`StepPlan.chainable`); None: on CUDA. (The server's loop has `--overlap`.)
    overlap: bool | None = None


def prefills_static(model: GenerationModel, cache: object) -> bool:
    """BLIP-2 with a decoder-only language model (OPT) has a fixed-shape prefill; Flan-T5 and BLIP do not."""
    return model.capabilities.static_prefill and type(cache) is KVCache


def bnb_int8(model: torch.nn.Module) -> bool:
    """bitsandbytes' LLM.int8 finds outlier columns with host-side indexing: not capturable."""
    return any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
