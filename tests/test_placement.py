"""The Python API's `device` and `dtype` arguments: what "auto" picks (bfloat16 for Flan-T5 on CUDA: its
activations overflow fp16), the warning for an explicit float16 with T5, and a ValueError naming the
argument for every value that is not one (CUDA on a CPU build was a bare AssertionError from torch)."""

from __future__ import annotations

import logging

import pytest
import torch

from model import Blip2Engine
from model.placement import resolve_device, resolve_dtype

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a host without CUDA")


@pytest.mark.parametrize(
    "dtype, device, t5, want",
    [
        ("auto", "cuda", True, torch.bfloat16),
        (None, "cuda:1", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),
        ("auto", "cpu", True, torch.float32),
        ("auto", torch.device("cpu"), False, torch.float32),
        ("bfloat16", "cpu", False, torch.bfloat16),
        (torch.float16, "cuda", False, torch.float16),
        ("float32", "cuda", True, torch.float32),
    ],
)
def test_auto_picks_bfloat16_for_t5_on_cuda(dtype, device, t5, want, caplog):
    with caplog.at_level(logging.WARNING, logger="model.placement"):
        assert resolve_dtype(dtype, device, t5=t5) == want
    assert not caplog.records


@pytest.mark.parametrize("dtype", ["float16", torch.float16])
def test_float16_with_t5_only_when_asked_and_with_a_warning(dtype, caplog):
    with caplog.at_level(logging.WARNING, logger="model.placement"):
        assert resolve_dtype(dtype, "cuda", t5=True) == torch.float16
    assert "overflow" in caplog.text and "bfloat16" in caplog.text


@pytest.mark.parametrize("dtype", ["fp16", "half", "", torch.int8, torch.float64, 16])
def test_a_dtype_that_is_not_one_is_a_value_error(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be 'auto' or one of"):
        resolve_dtype(dtype, "cpu")


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:x", "cuda:-1", "mps", "", 0, None])
def test_a_device_that_is_not_one_is_a_value_error(device):
    with pytest.raises(ValueError, match=r"^device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        resolve_device(device)


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda")])
def test_cuda_without_cuda_says_so(device):
    build = "a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
    with pytest.raises(ValueError, match=rf"^device 'cuda(:\d)?': CUDA is not available \(.*{build}"):
        resolve_device(device)


@NO_CUDA
def test_the_python_api_raises_value_errors_before_fetching_anything():
    """From `from_pretrained` and `load_dir`, before the hub is asked (the id here does not exist)."""
    with pytest.raises(ValueError, match="CUDA is not available"):
        Blip2Engine.from_pretrained(device="cuda")
    with pytest.raises(ValueError, match="^device must be"):
        Blip2Engine.from_pretrained("nobody/no-such-model", device="gpu")
    with pytest.raises(ValueError, match="^dtype must be"):
        Blip2Engine.from_pretrained("nobody/no-such-model", dtype="fp16")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Blip2Engine.load_dir("/nonexistent", "x", device="cuda:0")


def test_the_engine_resolves_dtype_from_the_checkpoint(checkpoints, caplog):
    """A Flan-T5 checkpoint is recognised: float16 asked for warns; OPT in float16 does not."""
    with caplog.at_level(logging.WARNING, logger="model.placement"):
        engine = Blip2Engine.from_pretrained(str(checkpoints("t5")[0]), dtype="float16")
    assert engine.dtype == torch.float16 and "overflow" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.placement"):
        engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]), dtype="float16")
    assert engine.dtype == torch.float16 and not caplog.records
    assert Blip2Engine.from_pretrained(str(checkpoints("t5")[0]), dtype="auto").dtype == torch.float32
