"""Executes a `StepPlan` on the model: vision stage, prefill, one decode step, the batched sampler.

Plain data in (`StepPlan`), plain data out (`StepOutput`): the runner keeps no sequence's state."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..arch.family import GenerationModel, RetrievalModel
from ..arch.retrieval import run_retrievals
from ..decoding import sampler
from .device import device_index, host_longs, to_device
from .options import DecodeOptions, bnb_int8, prefills_static
from .plan import SequenceWork, StepOutput, StepPlan
from .scoring import run_scorings
from .static_decode import StaticDecoder
from .static_prefill import StaticPrefill
from .static_vision import StaticVision
from .vision_worker import VisionWorker


class EmbeddingCache:
    """LRU of query embeddings by image content key, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self.items:
            return
        self.items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


T = TypeVar("T")
log = logging.getLogger("blipserve.runner")


def _halving(fn: Callable[[list], T], items: list, on_split: Callable[[], None]) -> list[T]:
    """fn(items), or, on out-of-memory, fn over each half (recursively); one item that OOMs re-raises."""
    try:
        return [fn(items)]
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
    on_split()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    return _halving(fn, items[:half], on_split) + _halving(fn, items[half:], on_split)


class Stopwatch:
    """Stage times without synchronising the device between stages: on CUDA, events recorded in the
    stream and read after the step (whose token read has waited for the device anyway); on CPU, where
    every op has finished when it returns, the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class DecodeInputs:
    """The rows of a decode step: each one's position and cache slot, and the tokens the host must
    write (beams' rows, whose last token the host chose). The other rows' tokens are on the device
    already, in the runner's per-slot token buffer (`sampler.launch`)."""

    positions: list[int]
    slots: list[int]
    host_slots: list[int]
    host_tokens: list[int]


def _decode_inputs(works: list[SequenceWork]) -> DecodeInputs:
    # A work's rows are all on the host (beams) or all on the device.
    host = [w for w in works if w.tokens[0] is not None]
    return DecodeInputs(
        [p for w in works for p in w.positions],
        [s for w in works for s in w.slots],
        [s for w in host for s in w.slots],
        [t for w in host for t in w.tokens],
    )


@dataclass
class Launched:
    """A step whose device work is queued and whose tokens are not read back yet (`ModelRunner.launch`)."""

    plan: StepPlan
    out: StepOutput
    sampled: list[sampler.Sampled]
    marks: dict


class ModelRunner:
    def __init__(
        self,
        model: GenerationModel | RetrievalModel,
        num_slots: int,
        max_len: int,
        embedding_cache_bytes: int = 256 << 20,
        options: DecodeOptions | None = None,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`normalize`: uint8 [..., H, W, 3] pixels -> float [..., 3, H, W] (`ImageProcessor.normalize`),
        for requests whose pixels arrive before normalising (a CUDA engine's: a quarter of the bytes, and
        the lookup runs on the device)."""
        options = options or DecodeOptions()
        self.normalize = normalize
        self.model = model
        self.device = model.device
        self.options = options
        self.num_slots, self.max_len = num_slots, max_len
        # Retrieval models decode nothing: no KV cache. One slot more than the scheduler's: the static
        # decode step's idle rows write there.
        self.cache = model.new_cache(num_slots + 1, max_len) if model.capabilities.generates else None
        # Each slot's last token, on the device: decode steps read their input tokens here, where the
        # token choice writes them, so a step can be launched before the last one's tokens are read.
        self.slot_tokens = torch.zeros(num_slots + 1, dtype=torch.long, device=self.device)
        # Each slot's token history (prompt ids, then each chosen token), on the device, for the
        # processors that read it (repetition penalty, no-repeat n-grams): made at the first prefill
        # that needs it. A history is at most max_len + 1 long (the last token takes no position).
        self.history: torch.Tensor | None = None
        int8 = bnb_int8(model)
        graphs = options.cuda_graphs and self.device.type == "cuda" and not int8
        self.static = None
        if self.cache is not None and options.static:
            self.static = StaticDecoder(
                model.decode, self.cache, num_slots, options.kv_step, graphs, self.slot_tokens
            )
        self.static_prefill = None
        if graphs and options.prefill_graphs and prefills_static(model, self.cache):
            shape = (model.cfg.num_query_tokens, model.cfg.text_hidden)
            self.static_prefill = StaticPrefill(
                model.prefill_static, self.cache, num_slots, shape, self.cache.k.dtype
            )
        self.static_vision = None
        if graphs and options.vision_batch:
            side = model.cfg.vision.image_size
            self.static_vision = StaticVision(
                model.encode_images, options.vision_batch, (3, side, side), self.device
            )
        self.embeddings = EmbeddingCache(embedding_cache_bytes)
        self.vision = VisionWorker(self.device)
        # Embeddings from the background vision stage, kept until their requests have prefilled (the
        # LRU cache may be too small to hold them, or off).
        self.fresh: dict[str, torch.Tensor] = {}
        self.clock = Stopwatch(self.device)
        self.oom_splits = 0  # batches split in two after running out of memory

    @property
    def graphs_on(self) -> bool:
        return self.static is not None and self.static.graphs_on

    def prepare(self) -> int:
        """Capture the decode step's, the vision stage's and the prefill's CUDA graphs now, before
        traffic (a no-op without them); returns how many are ready. Call it from the thread that will run the steps,
        before it runs any."""
        count = 0
        start = time.perf_counter()
        if self.graphs_on:
            count += self.static.capture_all()
        if self.static_vision is not None:
            count += self.static_vision.capture_all()
        if self.static_prefill is not None:
            count += self.static_prefill.capture_all()
        if count:
            log.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - start)
        return count

    def run(self, plan: StepPlan) -> StepOutput:
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> Launched:
        """Queue the step's device work (on CUDA the host returns before the device is done) and pick
        tokens on the device; `collect` reads them. Another step may be launched in between when
        `plan.chainable`: it feeds these tokens from the device."""
        out = StepOutput()
        if plan.encode:
            self._start_encoding(plan, out)
        # With nothing else to do this step, wait for the vision stage rather than spin.
        self._collect(out, wait=not plan.runs_model and not out.encoded)
        marks = {"start": self.clock.mark()}
        fresh = self._vision(plan, out)
        marks["vision"] = self.clock.mark()
        if plan.moves is not None and plan.moves.src:
            self.cache.reorder(plan.moves.src, plan.moves.dst, plan.moves.upto)
        sampled = []
        if plan.prefills:
            logits = torch.cat(_halving(lambda ws: self._prefill(ws, fresh), plan.prefills, self._split))
            self._write_prompts(plan.prefills)
            sampled.append(sampler.launch(plan.prefills, logits, self.slot_tokens, None, self.history))
            marks["prefill"] = self.clock.mark()
        if plan.decodes:
            before = self.clock.mark()
            logits, row_slots = self._decode(plan.decodes)
            out.decode_rows = logits.shape[0]
            sampled.append(sampler.launch(plan.decodes, logits, self.slot_tokens, row_slots, self.history))
            marks["decode"], marks["before_decode"] = self.clock.mark(), before
        if plan.retrievals:
            out.retrievals = run_retrievals(self.model, plan.retrievals, fresh)
        if plan.scorings:
            for part in _halving(lambda ws: run_scorings(self.model, ws, fresh), plan.scorings, self._split):
                out.scorings.update(part)
        return Launched(plan, out, sampled, marks)

    @torch.inference_mode()
    def collect(self, step: Launched) -> StepOutput:
        """Read a launched step's tokens back (one wait for the device): plain data per sequence."""
        for p in step.sampled:
            step.out.sequences.update(sampler.read(p))
        self._timings(step.out, step.marks)
        return step.out

    def _write_prompts(self, works: list[SequenceWork]) -> None:
        """Each prefilled row's token history starts as its request's prompt ids (only requests whose
        processors read it carry them: `SequenceWork.prompt_ids`)."""
        works = [w for w in works if w.prompt_ids is not None]
        if not works:
            return
        if self.history is None:
            shape = (self.num_slots + 1, self.max_len + 1)
            self.history = torch.zeros(shape, dtype=torch.long, device=self.device)
        if (longest := max(len(w.prompt_ids) for w in works)) > self.max_len:
            raise ValueError(f"a prompt history of {longest} tokens exceeds the runner's {self.max_len}")
        slots = [s for w in works for s in w.slots for _ in w.prompt_ids]
        at = [i for w in works for _ in w.slots for i in range(len(w.prompt_ids))]
        ids = [t for w in works for _ in w.slots for t in w.prompt_ids]
        index = to_device(host_longs(slots + at + ids), self.device).view(3, -1)
        self.history.index_put_((index[0], index[1]), index[2])

    def _timings(self, out: StepOutput, marks: dict) -> None:
        """Stage times, read once the step is over (the token read has synchronised the device)."""
        if out.vision_in_step:
            out.vision_s += self.clock.seconds(marks["start"], marks["vision"])
        if "prefill" in marks:
            out.prefill_s = self.clock.seconds(marks["vision"], marks["prefill"])
        if "decode" in marks:
            out.decode_s = self.clock.seconds(marks["before_decode"], marks["decode"])

    def _start_encoding(self, plan: StepPlan, out: StepOutput) -> None:
        """Background vision for `plan.encode`; images with embeddings already are reported at once."""
        keys = [
            k for k in dict.fromkeys(plan.encode) if k not in self.fresh and self.embeddings.get(k) is None
        ]
        out.encoded = [k for k in plan.encode if k not in keys]
        out.cache_hits += len(out.encoded)
        if keys:
            pixels = {k: plan.images[k] for k in keys}
            self.vision.submit(keys, lambda ks: self._encode(pixels, ks))

    def _collect(self, out: StepOutput, wait: bool) -> None:
        for batch in self.vision.collect(wait):
            if batch.error is not None:
                log.error("vision batch of %d images failed: %s", len(batch.keys), batch.error)
                out.vision_errors.update(dict.fromkeys(batch.keys, batch.error))
                continue
            for key, value in batch.embeddings.items():
                self.fresh[key] = value
                self.embeddings.put(key, value)
            out.encoded += batch.keys
            out.vision_images += len(batch.keys)
            out.vision_s += batch.seconds

    def _vision(self, plan: StepPlan, out: StepOutput) -> dict[str, torch.Tensor]:
        """Embeddings of the images this step's prefills, retrievals and scorings need; missing ones
        encoded now."""
        needed = {w.image_key for w in [*plan.prefills, *plan.scorings]}
        needed |= {w.image_key for w in plan.retrievals if w.image_key}
        found = {k: v for k in needed if (v := self.fresh.pop(k, None)) is not None}
        cached = {k: v for k in needed - found.keys() if (v := self.embeddings.get(k)) is not None}
        out.cache_hits += len(cached)
        found |= cached
        missing = [k for k in needed if k not in found]
        if missing:
            embeds = self._encode(plan.images, missing)
            for key, value in zip(missing, embeds, strict=True):
                found[key] = value
                self.embeddings.put(key, value)
            out.vision_images += len(missing)
            out.vision_in_step = True
        return found

    def _encode(self, images: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """Query embeddings of `keys`' images as one batch (halved while it runs out of memory)."""
        return torch.cat(_halving(lambda ks: self._encode_batch(images, ks), keys, self._split))

    def _encode_batch(self, images: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        items = [images[k] for k in keys]
        if len({p.dtype for p in items}) > 1:  # a mixed batch: its uint8 images normalised here
            items = [self._normalized(p) for p in items]
        pixels = self._normalized(to_device(torch.stack(items), self.device))  # uint8: on the device
        out = self.static_vision.run(pixels) if self.static_vision is not None else None
        return out if out is not None else self.model.encode_images(pixels)

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels
        if self.normalize is None:
            raise ValueError("uint8 pixels need the runner's `normalize` (the checkpoint's image processor)")
        return self.normalize(pixels)

    def _split(self) -> None:
        self.oom_splits += 1

    def _prefill(self, works: list[SequenceWork], embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prompts run once per request into its first slot; its other rows (beams, samples) copy that slot."""
        first = [w.slots[0] for w in works]
        if self.static_prefill is not None:
            queries = [embeds[w.image_key] for w in works]
            logits = self.static_prefill.run(queries, [w.text_ids for w in works], first)
        else:
            inputs = [self.model.prompt_inputs(embeds[w.image_key], w.text_ids) for w in works]
            logits = self.model.prefill(inputs, device_index(first, self.device), self.cache)
        src, dst = [], []
        for w in works:
            src += [w.slots[0]] * (len(w.slots) - 1)
            dst += w.slots[1:]
        self.cache.copy_slots(src, dst)
        # Every beam of a request starts from the same logits.
        if all(len(w.slots) == 1 for w in works):
            return logits
        return torch.cat([logits[i : i + 1].expand(len(w.slots), -1) for i, w in enumerate(works)])

    def _decode(self, works: list[SequenceWork]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of every fed row, in `works` order: the fixed-shape step, or on out-of-memory (or with
        it off) rows gathered from their slots, halving the batch as long as it does not fit. Also the
        rows' slots on the device, when the step has them (for the sampler's token writes)."""
        if self.static is not None:
            inputs = _decode_inputs(works)
            try:
                logits = self.static.run(
                    inputs.positions, inputs.slots, inputs.host_slots, inputs.host_tokens
                )
                return logits, self.static.picked_slots(len(inputs.slots))
            except torch.OutOfMemoryError:
                self._split()
        return torch.cat(_halving(self._gathered, works, self._split)), None

    def _gathered(self, works: list[SequenceWork]) -> torch.Tensor:
        inputs = _decode_inputs(works)
        kv_len = max(inputs.positions) + 1
        dev = self.device
        if inputs.host_slots:
            self.slot_tokens[device_index(inputs.host_slots, dev)] = device_index(inputs.host_tokens, dev)
        slots = device_index(inputs.slots, dev)
        return self.model.decode(
            self.slot_tokens[slots], device_index(inputs.positions, dev), slots, self.cache, kv_len
        )
