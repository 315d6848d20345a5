"""Offline throughput: blipserve's engine vs transformers' `generate`, same weights, same device, one run.

    python bench/bench_engine.py                       # tiny checkpoint on CPU
    python bench/bench_engine.py --size opt-2.7b       # blip2-opt-2.7b shapes, random weights (CUDA)
    python bench/bench_engine.py --ref 58bc13d --threads 1     # this tree beside 58bc13d (batch 32)
    python bench/bench_engine.py --ref HEAD --rounds 1 --repeats 1 --threads 1   # smoke: ~1x

With --ref, transformers is left out: `Blip2Engine.generate` of this tree and of the reference commit
(a temporary checkout, bench/baseline.py) run the same batch on the same checkpoint (tiny, or --model,
e.g. one from bench/random_checkpoint.py), each in its own subprocess (bench/offline_probe.py), the
trees alternating for --rounds rounds; the medians and their ratio are printed.

Both sides decode greedily for exactly `--new-tokens` tokens (no stop token can end a sequence early),
so they do the same work. Prints images/s for each batch size and our/transformers ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.baseline import compare_table, reference_tree, spread, tree_command, tree_env  # noqa: E402
from bench.baseline import median as middle  # noqa: E402
from bench.shapes import SIZES, shrunk  # noqa: E402
from model import Blip2Engine, SamplingParams  # noqa: E402
from model.arch.blip2 import QFORMER_PRECISIONS  # noqa: E402
from model.checkpoint.config import Blip2Config  # noqa: E402
from model.checkpoint.loader import build_empty, load_weights  # noqa: E402
from model.checkpoint.tiny import train_tokenizer  # noqa: E402
from model.data.image import ImageProcessor  # noqa: E402
from model.data.tokenizer import TextTokenizer  # noqa: E402
from model.runtime.options import DecodeOptions  # noqa: E402


def build_pair(size: str, device: str, dtype: torch.dtype, tmp: Path):
    """transformers' model and ours with identical weights (random, or the tiny test checkpoint)."""
    from transformers import Blip2Config as HFConfig
    from transformers import Blip2ForConditionalGeneration

    if size == "tiny":
        from oracle import make_checkpoint

        make_checkpoint(tmp, "pre_ln", image_size=224)
        hf = Blip2ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
        return hf, Blip2Engine.from_pretrained(str(tmp), device=device, dtype=dtype)
    config = SIZES[size] if size in SIZES else shrunk(SIZES["opt-2.7b"], 2)
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


VARIANTS = {
    "default": DecodeOptions(),  # fixed-shape decode step; CUDA graphs on CUDA
    "no-graphs": DecodeOptions(cuda_graphs=False),  # the same step, launched eagerly
    "no-overlap": DecodeOptions(overlap=False),  # each step's tokens read before the next is launched
    "no-prefill-graphs": DecodeOptions(prefill_graphs=False),  # prefill eagerly, at exact shapes
    # (SDPA decode attention instead of the kernel is a load option now: decode_attention="sdpa".)
    "gathered": DecodeOptions(static=False),  # rows gathered from their cache slots, exact shapes
}


def vision_flops(engine) -> float:
    """Multiply-adds x 2 of the ViT for one image (matmuls and attention; norms and GELU left out)."""
    v = engine.cfg.vision
    t, h, m = (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, v.intermediate_size
    per_layer = 2 * t * h * 4 * h + 2 * t * h * m * 2 + 4 * t * t * h
    return per_layer * v.num_hidden_layers


def vision_rate(engine, batch: int, repeats: int, device: str) -> float:
    """Images/s of the vision stage alone (ViT + Q-Former + projection) at `batch`."""
    side = engine.cfg.vision.image_size
    pixels = torch.randn(batch, 3, side, side, device=device)

    def run():
        with torch.inference_mode():
            engine.model.encode_images(pixels)

    return batch / timed(run, repeats, device)


def throughput_table(args, hf, engine, dtype, variants: list[str]) -> dict[int, dict[str, float]]:
    """img/s of transformers and of each variant per batch size; prints the table as it goes."""
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(
        f"{'batch':>5} {'transformers':>13}" + "".join(f" {v:>10} {'ratio':>6}" for v in variants) + "  equal"
    )
    rates: dict[int, dict[str, float]] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        # Both sides start from a list of preprocessed images, as a server has them.
        side = engine.cfg.vision.image_size
        pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)))

        def run_hf(pixels=pixels):
            with torch.inference_mode():
                hf_pixels = torch.stack(pixels).to(args.device, dtype)
                hf.generate(pixel_values=hf_pixels, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=1)  # fmt: skip

        row = {"transformers": batch / timed(run_hf, args.repeats, args.device)}
        for v in variants:
            engine.decode_options = VARIANTS[v]
            row[v] = batch / timed(
                lambda p=pixels: engine.generate(p, None, params), args.repeats, args.device
            )
        engine.decode_options = VARIANTS[variants[0]]
        agree = agreement(hf, engine, pixels, args.new_tokens, args.device, dtype)
        cells = "".join(f" {row[v]:>10.1f} {row[v] / row['transformers']:>5.2f}x" for v in variants)
        print(f"{batch:>5} {row['transformers']:>13.1f}{cells}  {agree:.1%}")
        rates[batch] = row
    return rates


def summary(args, engine, rates: dict[int, dict[str, float]], variant: str, name: str) -> None:
    best_hf = max(rates.items(), key=lambda kv: kv[1]["transformers"])
    best_us = max(rates.items(), key=lambda kv: kv[1][variant])
    print(f"\nbest of each ({name}): transformers {best_hf[1]['transformers']:.1f} img/s at batch {best_hf[0]}, "
          f"blipserve {best_us[1][variant]:.1f} img/s at batch {best_us[0]}: "
          f"{best_us[1][variant] / best_hf[1]['transformers']:.2f}x")  # fmt: skip
    if 1 in rates:
        print(f"one image, {args.new_tokens} new tokens: {1e3 / rates[1][variant]:.1f} ms ({name})")
    batch = max(rates)
    rate, flops = vision_rate(engine, batch, args.repeats, args.device), vision_flops(engine)
    line = f"vision stage at batch {batch}: {rate:.1f} img/s, ViT {flops / 1e9:.3g} GFLOP/img, {rate * flops / 1e12:.3g} TFLOPS"
    if args.peak_tflops:
        roof = args.peak_tflops * 1e12 / flops
        line += f"; roofline {roof:.0f} img/s at {args.peak_tflops:.0f} TFLOPS peak: {rate / roof:.0%}"
    print(line + f" ({name})")


def floors(engine, batch: int, new_tokens: int, tflops: float | None, tbps: float | None) -> list[float]:
    """ms no implementation beats on this device, per stage: the ViT's arithmetic at `tflops`; the
    prefill's weight reads at `tbps` (or its arithmetic, if more); a decode step's weight and key/value
    reads at `tbps`, at the mean length of a caption. 0 where the rate is not given."""
    lm = engine.model.language_model
    cfg = engine.cfg.text
    weight = sum(p.numel() * p.element_size() for p in lm.parameters())
    params = sum(p.numel() for p in lm.parameters())
    prompt = engine.cfg.num_query_tokens + 1
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (prompt + new_tokens / 2)
    kv_bytes = batch * kv * engine.model.lm_dtype.itemsize
    vision = batch * vision_flops(engine) / (tflops * 1e12) * 1e3 if tflops else 0.0
    prefill = (
        max(weight / (tbps * 1e12), 2 * params * batch * prompt / (tflops * 1e12)) * 1e3
        if tbps and tflops
        else 0.0
    )
    decode = (weight + kv_bytes) / (tbps * 1e12) * 1e3 if tbps else 0.0
    return [vision, prefill, decode]


def qformer_table(args, engine, batch: int, name: str) -> None:
    """Each Q-Former precision: vision stage img/s at `batch`, and greedy tokens equal to float32's."""
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(99)))
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(
        f"\nQ-Former precision ({name}, batch {batch}): vision stage img/s, greedy tokens equal to float32's"
    )
    ref = None
    for precision in QFORMER_PRECISIONS:
        engine.model.set_qformer_precision(precision)
        rate = vision_rate(engine, batch, args.repeats, args.device)
        tokens = [r.token_ids for r in engine.generate(pixels, None, params)]
        ref = ref or tokens
        pairs = [(a, b) for g, w in zip(tokens, ref, strict=True) for a, b in zip(g, w, strict=False)]
        same = sum(a == b for a, b in pairs) / max(len(pairs), 1)
        print(f"{precision:>8} {rate:>10.1f} img/s  {same:.1%} tokens equal")
    engine.model.set_qformer_precision("auto")


def probe(tree: Path, model: str, args, dtype: str) -> dict:
    """bench/offline_probe.py's figures for the code of `tree`, in a subprocess (ValueError if it fails)."""
    cmd = tree_command(ROOT / "bench" / "offline_probe.py", "--model", model, "--device", args.device,
                       "--dtype", dtype, "--batches", args.batches, "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats), "--threads", str(args.threads))  # fmt: skip
    out = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ValueError(f"offline probe failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_with_ref(args, dtype: str) -> None:
    """`Blip2Engine.generate` img/s of this tree beside commit `args.ref`'s, same checkpoint, alternating
    trees over `args.rounds` rounds; prints each run, the medians and this tree / ref."""
    with tempfile.TemporaryDirectory() as tmp, reference_tree(args.ref) as ref:
        model = args.model
        if model is None:
            from oracle import make_checkpoint

            make_checkpoint(Path(tmp), "pre_ln", image_size=224)
            model = tmp
        trees = {"this tree": ROOT, f"ref {args.ref}": ref}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name in list(trees)[:: 1 if r % 2 == 0 else -1]:  # ABBA: drift hits both alike
                runs[name].append(probe(trees[name], model, args, dtype))
    ours, theirs = runs.values()
    print(f"model: {args.model or 'tiny'}; device: {args.device} ({ours[0]['threads']} threads); dtype: "
          f"{dtype}; {args.new_tokens} new tokens; {args.rounds} rounds x {args.repeats} repeats; img/s")  # fmt: skip
    rows = []
    for batch in args.batches.split(","):
        a, b = [[run["rates"][batch] for run in side] for side in (ours, theirs)]
        tokens = {run["tokens"][batch] for side in (ours, theirs) for run in side}
        if tokens != {float(args.new_tokens)}:
            print(f"warning: batch {batch}: tokens per image {sorted(tokens)}, not {args.new_tokens}")
        pairs = " / ".join(f"{x / y:.2f}" for x, y in zip(a, b, strict=True))  # each round's own ratio
        print(f"batch {batch} img/s, each round: this tree {spread(a)}; ref {spread(b)}; ratio {pairs}")
        rows.append((f"batch {batch} img/s", middle(a), middle(b)))
        a, b = [[1e3 * run["cpu"][batch] for run in side] for side in (ours, theirs)]
        print(f"batch {batch} CPU ms/img, each round: this tree {spread(a)}; ref {spread(b)}")
        rows.append((f"batch {batch} CPU ms/img", middle(a), middle(b)))
    print(compare_table(rows, "this tree", f"ref {args.ref}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", *SIZES, "opt-2.7b-2layers"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32; with --ref 32)")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=None, help=f"comma list of {sorted(VARIANTS)}; the first is ours")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="device's dense fp16 peak (H100 SXM: 989)"
    )
    ap.add_argument(
        "--peak-tbps", type=float, default=None, help="memory bandwidth, TB/s (H100 measured: 3.1)"
    )
    ap.add_argument("--ref", default=None, help="a commit: this tree beside it, no transformers")
    ap.add_argument("--rounds", type=int, default=3, help="--ref: runs of each tree, alternating")
    ap.add_argument("--model", default=None, help="--ref: a checkpoint directory (default: tiny)")
    ap.add_argument("--threads", type=int, default=0, help="--ref: torch threads (0: torch's default)")
    args = ap.parse_args()
    args.batches = args.batches or ("32" if args.ref else "1,8,32")
    if args.ref:
        return compare_with_ref(args, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float16" if args.device == "cuda" else "float32")
    ]
    variants = (
        args.variants or ("default,no-graphs" if args.device == "cuda" else "default,gathered")
    ).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        hf, engine = build_pair(args.size, args.device, dtype, Path(tmp))
    engine.eos_ids = (-1,)  # never stop early: both sides generate exactly --new-tokens
    name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; model: {args.size}; dtype: {dtype}; new tokens: {args.new_tokens}; img/s")
    rates = throughput_table(args, hf, engine, dtype, variants)
    summary(args, engine, rates, variants[0], name)
    qformer_table(args, engine, max(rates), name)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(f"\nblipserve per stage ({name}, {variants[0]}): ms per call, each beside its floor")
    print(
        f"{'batch':>5} {'vision+qformer':>15} {'floor':>7} {'prefill':>9} {'floor':>7} {'decode step':>12} {'floor':>7}"
    )
    for batch in rates:
        side = engine.cfg.vision.image_size
        pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)))
        vision, prefill, decode = stage_times(engine, pixels, params)
        low = floors(engine, batch, args.new_tokens, args.peak_tflops, args.peak_tbps)
        cells = [f"{x:>7.2f}" if x else f"{'-':>7}" for x in low]
        print(f"{batch:>5} {vision:>15.2f} {cells[0]} {prefill:>9.2f} {cells[1]} {decode:>12.3f} {cells[2]}")


if __name__ == "__main__":
    main()
