from __future__ import annotations

from pathlib import Path

import pytest
import torch
from oracle import make_checkpoint
from oracle_blip import BLIP_ARCHS, make_blip_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Tiny HF checkpoints by variant, written once per session: (path, fp32 transformers model)."""
    made: dict[str, tuple[Path, object]] = {}

    def get(variant: str = "pre_ln") -> tuple[Path, object]:
        if variant not in made:
            root = tmp_path_factory.mktemp(f"ckpt-{variant}")
            blip = variant in BLIP_ARCHS or variant == "blip2_itm"
            made[variant] = (root, (make_blip_checkpoint if blip else make_checkpoint)(root, variant))
        return made[variant]

    return get


@pytest.fixture(scope="module")
def root(checkpoints) -> Path:
    """The default tiny checkpoint's folder (the batch-job tests' model; a module may define its own)."""
    return checkpoints("pre_ln")[0]


@pytest.fixture(scope="module")
def engine(root: Path):
    """The offline engine on `root`, float32 on the CPU (a module may define its own)."""
    from model.engine import Blip2Engine

    return Blip2Engine.load_dir(root, str(root), "cpu", "float32")


def random_pixels(n: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
