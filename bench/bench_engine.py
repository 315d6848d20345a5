"""Offline throughput: blipserve's engine vs transformers' `generate`, same weights, same device, one run.

    python bench/bench_engine.py                       # tiny checkpoint on CPU
    python bench/bench_engine.py --size opt-2.7b       # blip2-opt-2.7b shapes, random weights (CUDA)

Both sides decode greedily for exactly `--new-tokens` tokens (no stop token can end a sequence early),
so they do the same work. Prints images/s for each batch size and our/transformers ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model import Blip2Engine, SamplingParams  # noqa: E402
from model.config import Blip2Config  # noqa: E402
from model.image import ImageProcessor  # noqa: E402
from model.loader import build_empty, load_weights  # noqa: E402
from model.tiny import train_tokenizer  # noqa: E402
from model.tokenizer import TextTokenizer  # noqa: E402

OPT_2_7B = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "cross_attention_frequency": 2},
    "text_config": {"model_type": "opt", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "ffn_dim": 10240, "max_position_embeddings": 2048,
                    "word_embed_proj_dim": 2560, "eos_token_id": 50118},
    "num_query_tokens": 32,
    "image_token_index": 50265,
}  # fmt: skip


def shrunk(config: dict, layers: int) -> dict:
    """The same widths with fewer layers: exercises the full-size code path on a small machine."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in ("vision_config", "qformer_config", "text_config"):
        out[key]["num_hidden_layers"] = layers
    return out


def build_pair(size: str, device: str, dtype: torch.dtype, tmp: Path):
    """transformers' model and ours with identical weights (random, or the tiny test checkpoint)."""
    from transformers import Blip2Config as HFConfig
    from transformers import Blip2ForConditionalGeneration

    if size == "tiny":
        from oracle import make_checkpoint

        make_checkpoint(tmp, "pre_ln", image_size=224)
        hf = Blip2ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
        return hf, Blip2Engine.from_pretrained(str(tmp), device=device, dtype=dtype)
    config = OPT_2_7B if size == "opt-2.7b" else shrunk(OPT_2_7B, 2)
    with torch.device(device):
        hf = Blip2ForConditionalGeneration(HFConfig(**config)).to(dtype).eval()
    hf.qformer.float()
    hf.query_tokens.data = hf.query_tokens.data.float()
    hf.save_pretrained(tmp)
    model = build_empty(Blip2Config.from_dict(config), dtype, torch.device(device))
    load_weights(model, sorted(tmp.glob("*.safetensors")))
    tok = TextTokenizer(train_tokenizer())
    return hf, Blip2Engine(model, tok, ImageProcessor(), "opt-2.7b-random")


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def stage_times(engine, pixels, params) -> tuple[float, float, float]:
    """Mean ms of the vision stage, the prefill and one decode step, from the runner's own timings."""
    outs = []
    requests = [engine.request(p, f"stage-{i}", None, params) for i, p in enumerate(pixels)]
    engine.run_offline(requests, on_step=outs.append)
    decodes = [o.decode_s for o in outs if o.decode_rows]
    return outs[0].vision_s * 1e3, outs[0].prefill_s * 1e3, 1e3 * sum(decodes) / max(len(decodes), 1)


def agreement(hf, engine, pixels, new_tokens: int, device: str, dtype: torch.dtype) -> float:
    """Share of generated tokens equal to transformers' at the same position (fp32: 100%)."""
    with torch.inference_mode():
        ref = hf.generate(pixel_values=torch.stack(pixels).to(device, dtype), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)  # fmt: skip
    prompt = engine.cfg.num_query_tokens + 1
    ours = engine.generate(pixels, None, SamplingParams(max_new_tokens=new_tokens))
    pairs = [
        (a, b)
        for r, o in zip(ref.tolist(), ours, strict=True)
        for a, b in zip(r[prompt:], o.token_ids, strict=False)
    ]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "opt-2.7b", "opt-2.7b-2layers"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float16" if args.device == "cuda" else "float32")
    ]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf, engine = build_pair(args.size, args.device, dtype, Path(tmp))
    engine.eos_ids = (-1,)  # never stop early: both sides generate exactly --new-tokens
    side = engine.cfg.vision.image_size
    name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; model: {args.size}; dtype: {dtype}; new tokens: {args.new_tokens}")
    print(f"{'batch':>5} {'transformers img/s':>19} {'blipserve img/s':>16} {'ratio':>6}")
    params = SamplingParams(max_new_tokens=args.new_tokens)
    stages: list[tuple[int, tuple[float, float, float]]] = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # Both sides start from a list of preprocessed images, as a server has them.
        pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)))

        def run_hf(pixels=pixels):
            with torch.inference_mode():
                hf_pixels = torch.stack(pixels).to(args.device, dtype)
                hf.generate(pixel_values=hf_pixels, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=1)  # fmt: skip

        def run_ours(pixels=pixels):
            engine.generate(pixels, None, params)

        t_hf = timed(run_hf, args.repeats, args.device)
        t_ours = timed(run_ours, args.repeats, args.device)
        agree = agreement(hf, engine, pixels, args.new_tokens, args.device, dtype)
        print(
            f"{batch:>5} {batch / t_hf:>19.1f} {batch / t_ours:>16.1f} {t_hf / t_ours:>5.2f}x  tokens equal: {agree:.1%}"
        )
        stages.append((batch, stage_times(engine, pixels, params)))
    print(f"\nblipserve per stage ({name}): ms per call")
    print(f"{'batch':>5} {'vision+qformer':>15} {'prefill':>9} {'decode step':>12}")
    for batch, (vision, prefill, decode) in stages:
        print(f"{batch:>5} {vision:>15.2f} {prefill:>9.2f} {decode:>12.3f}")


if __name__ == "__main__":
    main()
