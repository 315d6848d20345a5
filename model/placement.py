"""Where and in which dtype a model runs: the Python API's `device` and `dtype` arguments checked and
resolved (`Blip2Engine.from_pretrained`, `load_dir`; the server's `--device` / `--dtype` end here too).

`dtype="auto"` (or None): float32 on the CPU; on CUDA bfloat16 for a Flan-T5 language model and float16
for the others. T5's activations pass fp16's 65504 (transformers #9295, #21574): in float16 the model
keeps what transformers keeps in float32 (see `model.arch.t5`), but bfloat16, with float32's range, is
the safe choice, so float16 with T5 is only used when asked for, with a warning.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype argument as a torch dtype, or None for "auto" / None (chosen by `resolve_dtype`).

    Raises ValueError naming the argument for anything but "auto", the names of `DTYPES` or those dtypes."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype must be 'auto' or one of {sorted(DTYPES)} (or those torch dtypes), got {dtype!r}"
    )


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device, t5: bool = False
) -> torch.dtype:
    """The dtype a model runs in on `device` (a resolved one: "cpu", "cuda", "cuda:N").

    "auto" / None: float32 on the CPU; on CUDA bfloat16 when `t5` (a Flan-T5 language model), else
    float16. An explicit float16 with `t5` is kept, with a warning logged. ValueError for a dtype that is
    not one (see `parse_dtype`)."""
    chosen = parse_dtype(dtype)
    if chosen is None:
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if t5 else torch.float16
    if chosen == torch.float16 and t5:
        log.warning(
            "float16 with a T5 language model: T5's activations overflow float16 (transformers #9295); "
            "its feed-forward output and residual stream run in float32 as in transformers, and the rest "
            "of a block's sums are clamped to float16's range. bfloat16 (dtype auto) is the safe choice."
        )
    return chosen


def resolve_device(device: str | torch.device) -> torch.device:
    """A device argument checked against this torch build and host: "cpu", "cuda", "cuda:N", "auto" (CUDA
    when a device is visible, else the CPU), or a torch.device of those.

    Raises ValueError naming the argument: for any other value, for CUDA when torch is a CPU build or no
    CUDA device is visible, and for a CUDA index past the visible devices."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device) if isinstance(device, torch.device) else device
    if not isinstance(text, str) or not DEVICE.fullmatch(text):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is built with CUDA {torch.version.cuda}, but no CUDA device is visible"
            if torch.version.cuda
            else f"torch {torch.__version__} is a CPU build"
        )
        raise ValueError(
            f"device {text!r}: CUDA is not available ({why}); use device='cpu', or a CUDA build of torch "
            "on a GPU host"
        )
    where = torch.device(text)
    count = torch.cuda.device_count()
    if where.index is not None and where.index >= count:
        raise ValueError(f"device {text!r}: only {count} CUDA device(s) are visible")
    return where
