"""`--quantize int8` (W8A16) against fp16: per linear, per decode step, offline, and token agreement.

    python bench/bench_int8.py --size opt-2.7b            # on a GPU: the issue's figures
    python bench/bench_int8.py --size opt-2.7b --layers 1 --rows 1,4 --batch 2   # a CPU smoke run

Random weights at the hub's shapes (`bench/shapes.py`; `--layers N` keeps N layers of each stack). Every
figure is printed beside fp16's, measured in the same run on the same device:

1. each decoder-layer linear (qkv, out, fc1, fc2) at 1 ... 256 rows: on CUDA timed inside a CUDA graph over
   8 copies of the weights in turn (so the L2 cache cannot hold them), medians of CUDA events;
2. one decode step (the fixed-shape step of `model.runtime.static_decode`, a graph replay on CUDA) per row bucket;
3. offline: captions/s at `--batch`, one image's latency, weight bytes, and the share of greedy tokens
   int8 gives equal to fp16's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import SIZES, shrunk  # noqa: E402
from model import Blip2Engine, SamplingParams  # noqa: E402
from model.checkpoint.config import Blip2Config  # noqa: E402
from model.checkpoint.loader import build_empty  # noqa: E402
from model.checkpoint.tiny import train_tokenizer  # noqa: E402
from model.data.image import ImageProcessor  # noqa: E402
from model.data.tokenizer import TextTokenizer  # noqa: E402
from model.kernels.w8a16 import available as kernel_available  # noqa: E402
from model.kernels.w8a16 import w8a16_matmul  # noqa: E402
from model.runtime.options import DecodeOptions  # noqa: E402
from model.runtime.quant import dequantize_rows, quantize_rows, quantize_w8a16, weight_bytes  # noqa: E402

COPIES = 8  # weight copies a timed graph cycles through


def build(size: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> Blip2Engine:
    config = shrunk(SIZES[size], layers) if layers else SIZES[size]
    model = build_empty(Blip2Config.from_dict(config), dtype, device)
    lm = model.language_model
    lm.lm_head.weight = lm.model.decoder.embed_tokens.weight  # tied, as the checkpoint loads it
    gen = torch.Generator(device).manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02, generator=gen)
    return Blip2Engine(model, TextTokenizer(train_tokenizer()), ImageProcessor(), f"{size}-random")


def time_us(fn, device: torch.device, repeats: int = 20) -> float:
    """Median microseconds of `fn` (which runs COPIES calls): in a CUDA graph on CUDA, else wall clock."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6 / COPIES
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_us(graph, repeats) / COPIES


def replay_us(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    """Median microseconds of one replay, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def linear_table(engine: Blip2Engine, rows: list[int], dtype: torch.dtype) -> None:
    cfg, device = engine.cfg.text, engine.device
    h = cfg.hidden_size
    shapes = {"qkv": (3 * h, h), "out": (h, h), "fc1": (cfg.ffn_dim, h), "fc2": (h, cfg.ffn_dim)}
    kernel = device.type == "cuda" and kernel_available()
    print(f"\nper linear, us ({'W8A16 Triton kernel' if kernel else 'int8: dequantize + matmul'})")
    print(f"{'linear':>6} {'rows':>5} {'fp16':>9} {'int8':>9} {'int8/fp16':>10}")
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(COPIES)]
        quantized = [quantize_rows(w) for w in weights]
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)

            def fp16(x=x, weights=weights):
                for w in weights:
                    F.linear(x, w)

            def int8(x=x, quantized=quantized):
                for q, s in quantized:
                    if kernel:
                        w8a16_matmul(x, q, s.to(dtype), None)
                    else:
                        F.linear(x, dequantize_rows(q, s).to(dtype))

            a, b = time_us(fp16, device), time_us(int8, device)
            print(f"{name:>6} {m:>5} {a:>9.1f} {b:>9.1f} {b / a:>9.2f}x")


def step_us(engine: Blip2Engine, rows: int, kv: int) -> float:
    """One fixed-shape decode step over `rows` rows reading `kv` positions: microseconds."""
    runner = engine.new_runner(rows, kv, 0, DecodeOptions(prefill_graphs=False))  # decode graphs only
    runner.prepare()
    static = runner.static
    positions, slots = [kv - 1] * rows, list(range(rows))

    def step():
        for _ in range(COPIES):  # the same weights: a step reads them all, far more than L2 holds
            static.run(positions, slots)

    return (
        time_us(step, engine.device, repeats=10)
        if engine.device.type != "cuda"
        else _replays(static, rows, kv)
    )


def _replays(static, rows: int, kv: int) -> float:
    static.run([kv - 1] * rows, list(range(rows)))  # loads the inputs
    graph = static.graphs.get(static.bucket(rows - 1, kv))
    return float("nan") if graph is None else replay_us(graph)


def offline(engine: Blip2Engine, batch: int, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(captions/s at `batch`, one image's ms, the batch's greedy tokens)."""
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1)))
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    results = {}
    for n in (batch, 1):
        engine.generate(pixels[:n], None, params)  # warm-up, graphs
        sync()
        start = time.perf_counter()
        results[n] = engine.generate(pixels[:n], None, params)
        sync()
        results[f"{n}s"] = time.perf_counter() - start
    return batch / results[f"{batch}s"], 1e3 * results["1s"], [r.token_ids for r in results[batch]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="opt-2.7b")
    ap.add_argument("--layers", type=int, default=None, help="keep this many layers of each stack")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = [int(r) for r in args.rows.split(",")]
    fp16 = build(args.size, args.layers, dtype, device)
    fp16.eos_ids = (-1,)  # every caption runs its full length on both sides
    int8 = copy.copy(fp16)
    int8.model = copy.deepcopy(fp16.model)
    quantize_w8a16(int8.model)
    int8._offline_runner = None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.size} ({args.layers or 'all'} layers), {dtype}, on {where}, torch {torch.__version__}")
    linear_table(fp16, rows, dtype)
    print(f"\none decode step (kv 64), us\n{'rows':>5} {'fp16':>10} {'int8':>10} {'int8/fp16':>10}")
    for m in rows:
        a, b = step_us(fp16, m, 64), step_us(int8, m, 64)
        print(f"{m:>5} {a:>10.1f} {b:>10.1f} {b / a:>9.2f}x")
    (rate_a, one_a, tokens_a), (rate_b, one_b, tokens_b) = (
        offline(e, args.batch, args.new_tokens) for e in (fp16, int8)
    )
    pairs = [(a, b) for g, w in zip(tokens_b, tokens_a, strict=True) for a, b in zip(g, w, strict=False)]
    same = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    bytes_a, bytes_b = weight_bytes(fp16.model), weight_bytes(int8.model)
    print(f"\noffline, {args.new_tokens} tokens: {'':>4} {'fp16':>10} {'int8':>10} {'int8/fp16':>10}")
    print(
        f"{'captions/s at batch ' + str(args.batch):>28} {rate_a:>10.1f} {rate_b:>10.1f} {rate_b / rate_a:>9.2f}x"
    )
    print(f"{'one image, ms':>28} {one_a:>10.1f} {one_b:>10.1f} {one_b / one_a:>9.2f}x")
    print(f"{'weights, GB':>28} {bytes_a / 1e9:>10.2f} {bytes_b / 1e9:>10.2f} {bytes_b / bytes_a:>9.2f}x")
    print(f"greedy tokens of int8 equal to fp16's: {same:.1%} ({len(pairs)} tokens)")


if __name__ == "__main__":
    main()
