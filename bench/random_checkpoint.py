"""Write a full-size BLIP-2 checkpoint with random weights (no download) for timing the server.

    python bench/random_checkpoint.py --size opt-2.7b --out /tmp/blip2-opt-2.7b-random
    blipserve --model /tmp/blip2-opt-2.7b-random --device cuda
    python bench/load.py --url http://127.0.0.1:8000

The hub's shapes and layout (config.json, model.safetensors with q/k/v projections, tokenizer.json,
preprocessor_config.json), with tiny-random's small trained tokenizer: the text is gibberish, and token
ids past the tokenizer's vocabulary decode to nothing, which timing does not mind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import SIZES, shrunk  # noqa: E402
from model.checkpoint.config import Blip2Config  # noqa: E402
from model.checkpoint.loader import build_empty  # noqa: E402
from model.checkpoint.tiny import _to_hf_names, train_tokenizer  # noqa: E402


def config(size: str, layers: int | None) -> dict:
    raw = shrunk(SIZES[size], layers) if layers else SIZES[size]
    text = {**raw["text_config"], "bos_token_id": 2, "pad_token_id": 1, "activation_function": "relu",
            "do_layer_norm_before": True, "enable_bias": True, "tie_word_embeddings": True}  # fmt: skip
    return {
        **raw,
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "text_config": text,
    }


def write(root: Path, size: str, layers: int | None, dtype: torch.dtype) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = config(size, layers)
    model = build_empty(Blip2Config.from_dict(raw), dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("lm_head.weight"):
            continue  # tied to the token embeddings, as in the hub's checkpoints
        norm = "norm" in name.lower() and name.endswith("weight")
        t.normal_(1.0 if norm else 0.0, 0.02, generator=gen)
        state[name] = t
    save_file(_to_hf_names(state), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    train_tokenizer().save(str(root / "tokenizer.json"))
    preprocessor = {"size": {"height": 224, "width": 224}, "do_resize": True, "resample": 3}
    (root / "preprocessor_config.json").write_text(json.dumps(preprocessor), encoding="utf-8")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="opt-2.7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers per stack (a quick check)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(write(Path(args.out), args.size, args.layers, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
