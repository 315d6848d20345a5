"""Host time of one engine step, without the model: what the device waits on between two steps.

    python bench/host_overhead.py --batches 16,64,256

The tiny checkpoint's decode is replaced by a stand-in that returns fixed logits at once, so a step's
time is the scheduler's and the runner's own work (plans, decoders, input buffers, the token read-back)
plus an argmax. On a GPU this time adds to every decode step that the device cannot hide.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from batching.scheduler import Scheduler  # noqa: E402
from model import Blip2Engine, SamplingParams  # noqa: E402


def step_times(engine: Blip2Engine, batch: int, new_tokens: int, params: SamplingParams) -> list[float]:
    """Seconds of each decode-only step while `batch` requests run to `new_tokens` tokens."""
    vocab = engine.cfg.text.vocab_size
    fixed = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    engine.model.decode = lambda tokens, *args, **kwargs: fixed[: tokens.shape[0]]
    runner = engine.new_runner(batch, 64, 0)
    scheduler = Scheduler(batch, batch, batch, (-1,))  # no stop token: every request runs to new_tokens
    params = replace(params, max_new_tokens=new_tokens)
    side = engine.cfg.vision.image_size
    pixels = torch.zeros(3, side, side)
    for i in range(batch // max(params.num_beams, params.n)):  # `batch` rows: one per beam or sample
        scheduler.add(engine.request(pixels, "same-image", None if i % 2 else "a photo of", params))
    times = []
    while scheduler.has_work:
        start = time.perf_counter()
        plan, _ = scheduler.schedule()
        out = runner.run(plan)
        scheduler.postprocess(plan, out)
        if not plan.prefills:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--sample", action="store_true", help="sampling (temperature, top-k, top-p), not greedy")
    ap.add_argument("--beams", type=int, default=1, help="beam search with this many beams per request")
    args = ap.parse_args()
    params = SamplingParams(num_beams=args.beams)
    if args.sample:
        params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.9, seed=0)
    from oracle import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), "pre_ln")
        engine = Blip2Engine.from_pretrained(tmp)
    kind = "sampling" if args.sample else f"{args.beams}-beam" if args.beams > 1 else "greedy"
    print(f"host time per {kind} decode step, CPU ({torch.get_num_threads()} threads), model stood in for")
    print(f"{'rows':>5} {'median ms':>10} {'us per row':>11}")
    for batch in [int(b) for b in args.batches.split(",")]:
        step_times(engine, batch, 3, params)  # warm-up
        median = statistics.median(step_times(engine, batch, args.new_tokens, params))
        print(f"{batch:>5} {median * 1e3:>10.3f} {median * 1e6 / batch:>11.1f}")


if __name__ == "__main__":
    main()
