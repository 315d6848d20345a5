"""Host time of one engine step, without the model: what the device waits on between two steps.

    python bench/host_overhead.py --batches 64,256 --modes stream+stop,stream,stop,greedy --ref 58bc13d

The tiny checkpoint's decode is replaced by a stand-in that returns precomputed logits at once, so a
step's time is the host's own work. Two sides are timed per decode step, in CPU time of the thread
(`time.thread_time`, torch on that one thread: other work on a shared machine does not count):

- engine: what the engine thread does (scheduler, the runner's host work and token read-back, the
  decoders, stop checks where the engine makes them, and encoding the `Progress` / `Done` messages as
  `batching/engine_io.py` does). On a GPU this time adds to every decode step the device cannot hide.
- front end: what the HTTP process does with those messages (decode them, make the text, stop strings).

Modes: "greedy" (no streaming, no stop string), "stream" (every request streams), "stop" (a stop string
that never matches: every request runs to --new-tokens), "stream+stop" (both: issue 22's case). `--ref COMMIT` runs the same measurement
against another commit's code (a `git worktree` in a temporary folder, this script in a subprocess with
PYTHONPATH at it) and prints both side by side with ratios; APIs that differ are told apart by feature.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
NEVER = "never-said-§"  # a stop string no output holds


def _code_root() -> Path:
    """The code measured: BLIPSERVE_CODE (a --ref worktree), else this checkout."""
    return Path(os.environ.get("BLIPSERVE_CODE", HERE))


class NewFrontEnd:
    """This work's front end: the engine's reports hold new tokens only (`RequestText`)."""

    def __init__(self, engine, request, stream: bool):
        from model.data.detokenizer import RequestText

        self.engine, self.request = engine, request
        self.text = RequestText(engine.tokenizer, request.prompt_ids, request.params)

    def progress(self, msg) -> None:
        self.text.add(msg.outputs)

    def done(self, msg) -> None:
        self.text.finish(msg.outputs)
        self.engine.result(self.request, self.text.token_outputs(), self.text.texts())


class OldFrontEnd:
    """The front end before: each report holds every token so far; text re-decoded per report."""

    def __init__(self, engine, request, stream: bool):
        from server.streaming import OutputStreams

        self.engine, self.request = engine, request
        self.streams = OutputStreams(engine, request) if stream else None

    def progress(self, msg) -> None:
        self.streams.progress(msg.outputs)

    def done(self, msg) -> None:
        result = self.engine.result(self.request, msg.outputs)
        if self.streams is not None:
            self.streams.final(result)


def adapters():
    """(engine-side report of a sequence or None, whether the engine reports each step, front end)."""
    import batching.client as client
    from batching.protocol import Progress, encode

    if hasattr(client, "progress_of"):
        from batching.protocol import reports_each_step

        def report(seq, req_id: int) -> bytes | None:
            msg = client.progress_of(seq, req_id)
            return encode(msg) if msg is not None else None

        return report, reports_each_step, NewFrontEnd

    def old_report(seq, req_id: int) -> bytes:
        return encode(Progress(req_id, seq.decoder.outputs()))

    return old_report, (lambda request, stream: stream), OldFrontEnd


def run_batch(engine, batch: int, new_tokens: int, params, mode: str) -> tuple[list[float], list[float]]:
    """Seconds per decode-only step on the engine side and on the front end, `batch` rows running."""
    import torch

    from batching.client import done_of
    from batching.protocol import decode_from_engine, encode
    from batching.scheduler import Scheduler

    report, reports_each_step, FrontEnd = adapters()
    vocab = engine.cfg.text.vocab_size
    table = torch.randn(8, batch, vocab, generator=torch.Generator().manual_seed(0))
    calls = iter(range(1 << 30))
    engine.model.decode = lambda tokens, *args, **kwargs: table[next(calls) % 8, : tokens.shape[0]]
    runner = engine.new_runner(batch, new_tokens + 40, 0)  # the prompt (image placeholders, text) + answer
    scheduler = Scheduler(batch, batch, batch, (-1,))  # no stop token: every request runs to new_tokens
    stream = mode in ("stream", "stream+stop")
    stop = (NEVER,) if mode in ("stop", "stream+stop") else ()
    params = replace(params, max_new_tokens=new_tokens, stop=stop)
    side = engine.cfg.vision.image_size
    pixels = torch.zeros(3, side, side)
    fronts = {}
    for i in range(batch // max(params.num_beams, params.n)):  # `batch` rows: one per beam or sample
        request = engine.request(pixels, "same-image", None if i % 2 else "a photo of", params)
        seq = scheduler.add(request)
        seq.stream = reports_each_step(request, stream)
        fronts[seq.seq_id] = FrontEnd(engine, request, stream)
    engine_s, front_s = [], []
    while scheduler.has_work:
        start = time.thread_time()
        plan, _ = scheduler.schedule()
        out = runner.run(plan)
        stepped = {w.seq_id for w in plan.prefills + plan.decodes}
        streaming = [s for s in scheduler.running if s.stream and s.seq_id in stepped]
        finished = scheduler.postprocess(plan, out)
        messages = [m for s in streaming if (m := report(s, s.seq_id)) is not None]
        messages += [encode(done_of(s)) for s in finished]
        middle = time.thread_time()
        for data in messages:
            msg = decode_from_engine(data)
            front = fronts[msg.req_id]
            front.progress(msg) if type(msg).__name__ == "Progress" else front.done(msg)
        end = time.thread_time()
        if not plan.prefills:
            engine_s.append(middle - start)
            front_s.append(end - middle)
    return engine_s, front_s


def measure(args: argparse.Namespace) -> list[dict]:
    """Per batch and mode: mean ms per decode step, engine side and front end (this process's code)."""
    import torch

    from model import Blip2Engine, SamplingParams

    torch.set_num_threads(args.threads)
    engine = Blip2Engine.from_pretrained(args.checkpoint)
    params = SamplingParams(num_beams=args.beams)
    if args.sample:
        params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.9, seed=0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for mode in args.modes.split(","):
            run_batch(engine, batch, 3, params, mode)  # warm-up
            # The best of a few runs: this machine's other work only ever adds time.
            runs = [run_batch(engine, batch, args.new_tokens, params, mode) for _ in range(args.repeats)]
            engine_ms = min(statistics.mean(e) for e, _ in runs) * 1e3
            front_ms = min(statistics.mean(f) for _, f in runs) * 1e3
            rows.append({"rows": batch, "mode": mode, "engine_ms": engine_ms, "front_ms": front_ms})
    return rows


def run_ref(commit: str, args: argparse.Namespace) -> list[dict]:
    """The same measurement on `commit`'s code: a temporary worktree, this script in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="blipserve-ref-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), commit], check=True)
        try:
            env = {
                **os.environ,
                "BLIPSERVE_CODE": str(tree),
                "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}",
            }
            argv = [sys.executable, __file__, "--json", "--checkpoint", args.checkpoint]
            argv += ["--batches", args.batches, "--modes", args.modes, "--new-tokens", str(args.new_tokens)]
            argv += [
                "--beams",
                str(args.beams),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            argv += ["--sample"] if args.sample else []
            out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd=tmp)
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,256")
    ap.add_argument(
        "--modes",
        default="greedy,stream,stop,stream+stop",
        help="greedy, stream, stop, stream+stop (comma-separated)",
    )
    ap.add_argument("--new-tokens", type=int, default=64, help="per request (at most 470)")
    ap.add_argument("--sample", action="store_true", help="sampling (temperature, top-k, top-p), not greedy")
    ap.add_argument("--beams", type=int, default=1, help="beam search with this many beams per request")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the engine's host work)")
    ap.add_argument("--ref", help="a commit to measure side by side (e.g. 58bc13d)")
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: a tiny one written here)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path[:0] = [str(_code_root()), str(_code_root() / "tests")]
    if args.json:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            from oracle import make_checkpoint

            make_checkpoint(Path(tmp), "pre_ln", max_position_embeddings=512)  # room for long answers
            args.checkpoint = tmp
        ref = run_ref(args.ref, args) if args.ref else None
        mine = measure(args)
    print(
        f"host ms per decode step (mean over {args.new_tokens} tokens, best of {args.repeats}), "
        f"CPU ({os.cpu_count()} cores, torch {args.threads} threads), model stood in"
    )
    head = f"{'rows':>5} {'mode':>7} {'engine':>8} {'front':>8}"
    if ref is None:
        print(head)
        for r in mine:
            print(f"{r['rows']:>5} {r['mode']:>7} {r['engine_ms']:>8.3f} {r['front_ms']:>8.3f}")
        return
    print(f"{head}   {args.ref:>8} {'engine':>8} {'front':>8}   ratio engine, front (this / ref)")
    for r, o in zip(mine, ref, strict=True):
        print(
            f"{r['rows']:>5} {r['mode']:>7} {r['engine_ms']:>8.3f} {r['front_ms']:>8.3f}   {'':>8} "
            f"{o['engine_ms']:>8.3f} {o['front_ms']:>8.3f}   "
            f"{r['engine_ms'] / o['engine_ms']:.2f}, {r['front_ms'] / max(o['front_ms'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
