"""Weight memory of blip2-opt at full size: fp16 vs `--quantize int8` (W8A16, counted) and `llm.int8`
(bitsandbytes LLM.int8, quantized for real).

    python bench/int8_memory.py --size opt-2.7b

Random weights at the hub's shapes (no download); runs on CPU (about 8 GB of RAM for opt-2.7b) or CUDA.
Counts every parameter and buffer once (tied embeddings once): what the weights occupy on the device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import SIZES  # noqa: E402
from model.checkpoint.config import Blip2Config  # noqa: E402
from model.checkpoint.loader import build_empty  # noqa: E402
from model.runtime.quant import int8_weight_bytes, quantize_int8, weight_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="opt-2.7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build_empty(Blip2Config.from_dict(SIZES[args.size]), torch.float16, device)
    lm = model.language_model
    lm.lm_head.weight = lm.model.decoder.embed_tokens.weight  # tied, as the checkpoint loads it
    gen = torch.Generator(device).manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02, generator=gen)
    fp16 = weight_bytes(model)
    w8a16 = int8_weight_bytes(model, "int8")  # counted: the language model's layer linears, per-row scales
    lm16 = sum(p.numel() * p.element_size() for p in lm.parameters())  # tied embeddings once
    lm8 = lm16 - (fp16 - w8a16)  # what W8A16 saves is all in the language model
    start = time.perf_counter()
    replaced = quantize_int8(model)
    seconds = time.perf_counter() - start
    int8 = weight_bytes(model)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.size} on {where}, torch {torch.__version__}")
    print(f"{'weights':>8} {'GB':>7} {'vs fp16':>8}")
    print(f"{'fp16':>8} {fp16 / 1e9:>7.2f} {1:>7.0%}")
    print(
        f"{'int8':>8} {w8a16 / 1e9:>7.2f} {w8a16 / fp16:>7.0%}   (--quantize int8: W8A16, language model only)"
    )
    print(
        f"{'':>8} {lm8 / 1e9:>7.2f} {lm8 / lm16:>7.0%}   (the language model alone: {lm16 / 1e9:.2f} GB in fp16)"
    )
    print(
        f"{'llm.int8':>8} {int8 / 1e9:>7.2f} {int8 / fp16:>7.0%}   ({replaced} linears, quantized in {seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
