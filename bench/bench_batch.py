"""`blipserve batch` beside `Blip2Engine.generate` on the same images, alternately, in one run.

    python bench/bench_batch.py                      # tiny-random on the CPU, 256 JPEGs of 320x240, 5 pairs
    python bench/bench_batch.py --images 512 --device cuda --model /path/to/checkpoint

Both sides start from the JPEG files and decode them (the job in its image pool, while the engine runs;
`generate`'s side first decodes a chunk, then generates it), and both write `--new-tokens` greedy tokens
per image (`min_new_tokens` = `max_new_tokens`: no stop token ends a sequence early, so the work is the
same). `generate` takes `--max-running-seqs` images per call (`run_offline`, the call `generate` makes,
so that its steps can be counted), the job's engine as many KV slots. The job is timed from its first row
to its last output written (journal, parquet, stats), a new engine each time (model load excluded); a
small job and a `generate` call run first, untimed, so that neither side pays one-time imports.

On a shared machine one run of each side says little: the sides alternate `--repeats` times and each pair
gives a ratio; the median ratio is the figure to quote. Beside images/s: the process's CPU seconds per
image (less noisy than the wall clock when other work shares the cores) and the engine's step shapes
(vision batch sizes, rows per decode step), which show whether the job keeps the engine's batch full.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Blip2Engine, SamplingParams  # noqa: E402
from model.data.image import decode_image  # noqa: E402
from model.runtime.plan import StepOutput  # noqa: E402
from server.batch.backends import JobSpec, LocalBackend, torch_threads  # noqa: E402
from server.batch.job import Options, plan, run  # noqa: E402
from server.batch.sources import find_shards  # noqa: E402
from server.settings import Settings  # noqa: E402


@dataclass
class Timing:
    """One timed run: wall seconds, process CPU seconds, and the engine's step shapes."""

    seconds: float
    cpu: float
    steps: int = 0
    vision: Counter = field(default_factory=Counter)  # vision batch size -> how many
    decode_rows: list[int] = field(default_factory=list)  # running sequences of each decode step

    def observe(self, out: StepOutput) -> None:
        self.steps += 1
        if out.vision_images:
            self.vision[out.vision_images] += 1
        if out.sequences:
            self.decode_rows.append(len(out.sequences))

    def shapes(self) -> str:
        mean = statistics.fmean(self.decode_rows) if self.decode_rows else 0.0
        batches = ", ".join(f"{size}x{n}" for size, n in sorted(self.vision.items(), reverse=True))
        return f"{self.steps} steps, {mean:.1f} sequences per step, vision batches {batches}"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Distinct random JPEGs (no two share a vision pass)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def time_generate(engine: Blip2Engine, paths: list[Path], params: SamplingParams, chunk: int) -> Timing:
    """Read, decode and caption every file, `chunk` images per call."""
    timing = Timing(0.0, 0.0)
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, len(paths), chunk):
        pixels = [
            engine.image_processor.preprocess(decode_image(p.read_bytes())) for p in paths[i : i + chunk]
        ]
        requests = [engine.request(px, f"object:{i + j}", None, params) for j, px in enumerate(pixels)]
        with torch.inference_mode():
            engine.run_offline(requests, on_step=timing.observe)
    timing.seconds, timing.cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return timing


def time_job(settings: Settings, folder: Path, out: Path, tokens: int, concurrency: int | None) -> Timing:
    """The batch job over the folder, as `blipserve batch` runs it (model loaded and warmed up before)."""
    spec = JobSpec(params={"max_new_tokens": tokens, "min_new_tokens": tokens})
    opts = Options(out, "parquet", concurrency=concurrency or 2 * settings.max_running_seqs, progress="none")
    timing = Timing(0.0, 0.0)

    async def go() -> None:
        backend = await asyncio.to_thread(LocalBackend, settings, spec)
        await backend.start()
        hook = backend.svc.lifecycle.loop.on_step

        def on_step(step_plan, step_out, scheduler) -> None:  # noqa: ANN001
            timing.observe(step_out)
            if hook is not None:
                hook(step_plan, step_out, scheduler)

        backend.svc.lifecycle.loop.on_step = on_step
        try:
            states, summary = plan(find_shards(str(folder)), opts, spec)
            cpu = cpu_seconds()
            summary = await run(backend, spec, opts, states, summary, asyncio.Event())
            timing.seconds, timing.cpu = summary.seconds, cpu_seconds() - cpu
        finally:
            await backend.close()
        if summary.answered != len(list(folder.iterdir())) or summary.errors:
            raise RuntimeError(f"the job answered {summary.answered} rows with {summary.errors} errors")

    asyncio.run(go())
    return timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--max-running-seqs", type=int, default=64)
    ap.add_argument("--concurrency", type=int, help="the job's rows in flight (default: the CLI's)")
    ap.add_argument("--repeats", type=int, default=5, help="pairs of runs (generate, then the job)")
    args = ap.parse_args()
    settings = Settings(
        model=args.model, device=args.device, dtype=args.dtype, max_running_seqs=args.max_running_seqs,
        max_batch_images=args.max_running_seqs, engine="thread", request_timeout_s=3600, log_level="warning",
    )  # fmt: skip
    # Both sides with the torch threads `blipserve batch` takes (engine_threads, else the cores less one).
    torch.set_num_threads(torch_threads(settings))
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    engine = Blip2Engine.from_pretrained(args.model, args.device, args.dtype)
    n, chunk = args.images, args.max_running_seqs
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        paths = write_images(Path(tmp) / "images", n, (320, 240))
        time_generate(engine, paths[:chunk], params, chunk)  # warm-up (untimed)
        write_images(Path(tmp) / "warm", 8, (320, 240))
        time_job(settings, Path(tmp) / "warm", Path(tmp) / "warm-out", 2, args.concurrency)
        pairs = []
        for r in range(args.repeats):
            gen = time_generate(engine, paths, params, chunk)
            job = time_job(
                settings, Path(tmp) / "images", Path(tmp) / f"out{r}", args.new_tokens, args.concurrency
            )
            pairs.append((gen, job))
            print(
                f"pair {r + 1}: generate {n / gen.seconds:6.1f} images/s ({1e3 * gen.cpu / n:.2f} ms CPU/image), "
                f"job {n / job.seconds:6.1f} images/s ({1e3 * job.cpu / n:.2f} ms CPU/image): "
                f"{gen.seconds / job.seconds:.2f}x",
                flush=True,
            )
    print(
        f"{n} images, {args.new_tokens} tokens each, {args.model} on {args.device}, torch threads {torch.get_num_threads()}"
    )
    for name, t in (("generate", pairs[-1][0]), ("job", pairs[-1][1])):
        print(f"{name} engine: {t.shapes()}")
    ratios = [g.seconds / j.seconds for g, j in pairs]
    cpu = statistics.median(j.cpu / g.cpu for g, j in pairs)
    print(
        f"batch / generate: median {statistics.median(ratios):.2f}x (pairs: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"CPU per image, job / generate: median {cpu:.2f}"
    )


if __name__ == "__main__":
    main()
