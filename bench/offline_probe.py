"""One offline measurement, `Blip2Engine.generate` images/s, for whichever tree PYTHONPATH names.

    PYTHONPATH=<tree> python -P bench/offline_probe.py --model DIR --batches 32 --new-tokens 20

`bench/bench_engine.py --ref COMMIT` runs this once per tree and round (see bench/baseline.py). It
imports only the stable surface (`model.Blip2Engine`, `model.SamplingParams`), so it runs on the
commits before and after a refactor of the engine alike. Every request decodes greedily for exactly
`--new-tokens` tokens (min_new_tokens = max_new_tokens), so both trees do the same work; the tokens made
are counted and reported. Prints one JSON line: {"rates": {batch: img/s}, "cpu": {batch: CPU s/img},
"tokens": {batch: mean tokens per image}, "threads": torch threads}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model import Blip2Engine, SamplingParams


def rate(engine, side: int, batch: int, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """Images/s of `engine.generate` on `batch` preprocessed random [3, side, side] images (the median
    of `repeats` timed calls after one warm-up call), this process's CPU seconds per image over those
    calls (steadier than wall time on a shared machine), and the mean number of tokens each generated."""
    pixels = list(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)))
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = engine.generate(pixels, None, params)  # warm-up
    times, cpu = [], time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(pixels, None, params)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu) / (repeats * batch)
    return batch / statistics.median(times), cpu, statistics.mean(len(r.token_ids) for r in out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a checkpoint directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="32")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Blip2Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    # From the checkpoint, not the engine: where the engine keeps its config may change.
    side = json.loads((Path(args.model) / "config.json").read_text())["vision_config"]["image_size"]
    rates, cpu, tokens = {}, {}, {}
    for batch in [int(b) for b in args.batches.split(",")]:
        rates[batch], cpu[batch], tokens[batch] = rate(engine, side, batch, args.new_tokens, args.repeats)
    print(json.dumps({"rates": rates, "cpu": cpu, "tokens": tokens, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
