"""`blipserve batch` beside `Blip2Engine.generate` on the same images, in one run.

    python bench/bench_batch.py                      # tiny-random on the CPU, 128 JPEGs of 320x240
    python bench/bench_batch.py --images 512 --device cuda --model /path/to/checkpoint

Both sides start from the JPEG files and decode them (the job in its image pool, while the engine runs;
`generate`'s side first decodes a chunk, then generates it), and both write `--new-tokens` greedy tokens
per image (`min_new_tokens` = `max_new_tokens`: no stop token ends a sequence early, so the work is the
same). `generate` takes `--max-running-seqs` images per call, the job's engine as many KV slots. The job
is timed from its first row to its last output written (journal, parquet, stats; not the model load).
Prints images/s of each and their ratio (the issue's target: the job >= 0.8x generate).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Blip2Engine, SamplingParams  # noqa: E402
from model.data.image import decode_image  # noqa: E402
from server.batch.backends import JobSpec, LocalBackend  # noqa: E402
from server.batch.job import Options, plan, run  # noqa: E402
from server.batch.sources import find_shards  # noqa: E402
from server.settings import Settings  # noqa: E402


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Distinct random JPEGs (no two share a vision pass)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def time_generate(engine: Blip2Engine, paths: list[Path], params: SamplingParams, chunk: int) -> float:
    """Seconds to read, decode and caption every file with `generate`, `chunk` images per call."""
    start = time.perf_counter()
    for i in range(0, len(paths), chunk):
        pixels = [
            engine.image_processor.preprocess(decode_image(p.read_bytes())) for p in paths[i : i + chunk]
        ]
        with torch.inference_mode():
            engine.generate(pixels, None, params)
    return time.perf_counter() - start


def time_job(settings: Settings, folder: Path, out: Path, tokens: int, concurrency: int) -> float:
    """Seconds the batch job takes over the folder (model loaded and warmed up before)."""
    spec = JobSpec(params={"max_new_tokens": tokens, "min_new_tokens": tokens})
    opts = Options(out, "parquet", concurrency=concurrency, progress="none")

    async def go() -> float:
        backend = await asyncio.to_thread(LocalBackend, settings, spec)
        await backend.start()
        try:
            states, summary = plan(find_shards(str(folder)), opts, spec)
            summary = await run(backend, spec, opts, states, summary, asyncio.Event())
        finally:
            await backend.close()
        if summary.answered != len(list(folder.iterdir())) or summary.errors:
            raise RuntimeError(f"the job answered {summary.answered} rows with {summary.errors} errors")
        return summary.seconds

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--max-running-seqs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="the best of this many runs of each side")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of both sides (on a busy 2-core machine, a team of 2 OpenMP threads in the "
        "main thread measured 15x slower than 1: a spinning team waits for a descheduled member)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(
        model=args.model, device=args.device, dtype=args.dtype, max_running_seqs=args.max_running_seqs,
        max_batch_images=args.max_running_seqs, engine="thread", request_timeout_s=3600, log_level="warning",
    )  # fmt: skip
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    engine = Blip2Engine.from_pretrained(args.model, args.device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = write_images(folder, args.images, (320, 240))
        time_generate(engine, paths[: args.max_running_seqs], params, args.max_running_seqs)  # warm-up
        gen, job = [], []
        for r in range(args.repeats):
            gen.append(time_generate(engine, paths, params, args.max_running_seqs))
            job.append(
                time_job(settings, folder, Path(tmp) / f"out{r}", args.new_tokens, 2 * args.max_running_seqs)
            )
    n = args.images
    print(
        f"{n} images, {args.new_tokens} tokens each, {args.model} on {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"Blip2Engine.generate (chunks of {args.max_running_seqs}): {n / min(gen):8.1f} images/s  (runs: {', '.join(f'{t:.2f}' for t in gen)} s)"
    )
    print(
        f"blipserve batch (in process):      {n / min(job):8.1f} images/s  (runs: {', '.join(f'{t:.2f}' for t in job)} s)"
    )
    print(f"batch / generate: {min(gen) / min(job):.2f}x")


if __name__ == "__main__":
    main()
