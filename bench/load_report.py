"""bench/load.py's summaries (servers side by side, this tree beside a reference commit with --ref) and its
transformers baseline (--hf)."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from PIL import Image

from bench.baseline import compare_table, median, ratio, spread

METRICS = ("rps", "p50", "p99", "engine_cpu", "model_cpu", "host_cpu", "http_cpu")


def side_by_side(table: list[tuple[str, int, dict]]) -> None:
    """req/s and p99 of every server at each concurrency, in one table (e.g. --dp 1 beside --dp 2)."""
    names = list(dict.fromkeys(name for name, _, _ in table))
    print("\nside by side: req/s (p99 ms)")
    print(f"{'conc':>5} " + " ".join(f"{n:>20}" for n in names))
    for c in sorted({c for _, c, _ in table}):
        cells = {n: r for n, cc, r in table if cc == c}
        row = [f"{cells[n]['rps']:.1f} ({cells[n]['p99'] * 1e3:.0f})" if n in cells else "-" for n in names]
        print(f"{c:>5} " + " ".join(f"{x:>20}" for x in row))


def medians(runs: list[dict[int, dict]]) -> dict[int, dict]:
    """Per level, the median of each of METRICS over the rounds."""
    return {c: {k: median([run[c][k] for run in runs]) for k in METRICS} for c in runs[0]}


def compare(ours: list[dict[int, dict]], refs: list[dict[int, dict]], name: str, ref: str) -> None:
    """This tree's medians beside the reference's, their ratios, served req/s at the highest level over
    that at 16 clients (or the lowest), and each round's req/s and engine CPU with the round's own ratio
    (the two servers of a round were measured back to back, so that ratio is steadier than either)."""
    a, b = medians(ours), medians(refs)
    units = {"rps": ("req/s", 1), "p50": ("p50 ms", 1e3), "p99": ("p99 ms", 1e3),
             "engine_cpu": ("engine CPU ms/req", 1), "model_cpu": ("  of which model", 1),
             "host_cpu": ("  of which host", 1), "http_cpu": ("HTTP CPU ms/req", 1)}  # fmt: skip
    rows = [
        (f"{c:>4} clients {units[k][0]}", a[c][k] * units[k][1], b[c][k] * units[k][1])
        for c in a
        for k in METRICS
        if not (math.isnan(a[c][k]) and math.isnan(b[c][k]))  # model / host: only with --model-cpu
    ]
    hi, lo = max(a), (16 if 16 in a else min(a))
    rows.append(
        (f"req/s at {hi} / at {lo}", ratio(a[hi]["rps"], a[lo]["rps"]), ratio(b[hi]["rps"], b[lo]["rps"]))
    )
    print(f"\n{name}: this tree beside ref {ref}, medians of {len(ours)} rounds (cpu: ms per request served)")
    print(compare_table(rows, "this tree", f"ref {ref}"))
    if len(ours) > 1:
        for c in a:
            for key in ("rps", "engine_cpu", "host_cpu"):
                if math.isnan(a[c][key]):
                    continue
                pairs = [ratio(x[c][key], y[c][key]) for x, y in zip(ours, refs, strict=True)]
                print(f"{c:>4} clients {key} by round: this tree {spread([r[c][key] for r in ours])}; "
                      f"ref {spread([r[c][key] for r in refs])}; ratio "
                      + " / ".join(f"{x:.2f}" for x in pairs) + f" (median {median(pairs):.2f}x)")  # fmt: skip


def hf_offline(root: Path, pics: list[bytes], new_tokens: int, batch: int) -> float:
    """transformers' batched `generate` of the same images (preprocessing included): images/s."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from model.data.image import ImageProcessor

    hf = Blip2ForConditionalGeneration.from_pretrained(root).eval()
    proc = ImageProcessor.from_dir(root)
    bos = torch.tensor([[hf.config.text_config.bos_token_id]])
    image_ids = torch.full((1, hf.config.num_query_tokens), hf.config.image_token_index)
    ids = torch.cat([image_ids, bos], 1)

    def run(chunk: list[bytes]) -> None:
        pixels = torch.stack([proc.preprocess(Image.open(io.BytesIO(b))) for b in chunk])
        with torch.inference_mode():
            hf.generate(pixel_values=pixels, input_ids=ids.expand(len(chunk), -1), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, num_beams=1)  # fmt: skip

    run(pics[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pics), batch):
        run(pics[i : i + batch])
    return len(pics) / (time.perf_counter() - start)
