"""`Blip2Engine`: the Python API over model, tokenizer and image processor.

    engine = Blip2Engine.from_pretrained("Salesforce/blip2-opt-2.7b", device="cuda", dtype="float16")
    engine.caption([image])                                  # ["two cats laying on a couch"]
    engine.generate([image], ["Question: how many cats? Answer:"], SamplingParams(num_beams=5))

`generate` batches everything it is given (one vision batch, one prefill, a shared decode batch that
sequences leave as they finish) through the server's own scheduler and engine loop, in-process: it adds
its requests and steps the loop until they finish (nano-vllm's `LLM.generate`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.config import read_config
from .checkpoint.loader import load_model, resolve_checkpoint
from .checkpoint.tiny import write_tiny_checkpoint
from .data.detokenizer import OfflineFrontEnd
from .data.image import ImageProcessor
from .data.tokenizer import TextTokenizer
from .decoding.generation import SamplingParams
from .frontend import Completion, Frontend, GenerationRequest, GenerationResult, needed_positions
from .placement import parse_dtype, resolve_device, resolve_dtype
from .processing import input_processor
from .runtime.options import DecodeOptions
from .runtime.plan import (
    RetrievalOutput,
    RetrievalRequest,
    RetrievalWork,
    ScoringRequest,
    ScoringWork,
    StepOutput,
    StepPlan,
)
from .runtime.runner import ModelRunner
from .runtime.scoring import ScoringResult

log = logging.getLogger(__name__)

# Request and result types live with the `Frontend`; imported from here as before.
__all__ = [
    "TINY_RANDOM",
    "Blip2Engine",
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "needed_positions",
]

TINY_RANDOM = "tiny-random"


class Blip2Engine(Frontend):
    """A `Frontend` (requests, results) with the model behind it: the offline API."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        image_processor: ImageProcessor,
        model_id: str,
    ):
        super().__init__(input_processor(model.cfg, tokenizer), image_processor, model_id)
        self.model = model
        self.device = model.device
        self.dtype = model.lm_dtype
        self.decode_options = DecodeOptions()
        # Offline calls keep their runner (its cache, its captured graphs) while it fits.
        self._offline_runner: ModelRunner | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = TINY_RANDOM,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        decode_attention: str = "auto",
    ) -> Blip2Engine:
        """A hub id, a local checkpoint directory or "tiny-random", loaded on `device` ("cpu", "cuda",
        "cuda:N", "auto") in `dtype` ("float32", "float16", "bfloat16", "auto" / None: float32 on the CPU;
        on CUDA bfloat16 for Flan-T5, else float16; see `model.placement`), its decode attention
        `decode_attention`: "auto" (OPT's Triton kernels on CUDA where they pass their self-checks),
        "sdpa" or "triton" (`model.kernels.backend`).

        Raises ValueError naming `device` or `dtype` when it is not one or CUDA is not available, before
        anything is fetched."""
        where, _ = resolve_device(device), parse_dtype(dtype)
        if model_id == TINY_RANDOM:
            with tempfile.TemporaryDirectory(prefix="blipserve-tiny-") as tmp:
                return cls._load(write_tiny_checkpoint(tmp), TINY_RANDOM, where, dtype, decode_attention)
        return cls._load(resolve_checkpoint(model_id), model_id, where, dtype, decode_attention)

    @classmethod
    def load_dir(
        cls,
        root: Path,
        model_id: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        decode_attention: str = "auto",
    ) -> Blip2Engine:
        """The checkpoint in local directory `root`, served under the name `model_id` (`device`, `dtype`
        and `decode_attention` as `from_pretrained`'s)."""
        where, _ = resolve_device(device), parse_dtype(dtype)
        return cls._load(root, model_id, where, dtype, decode_attention)

    @classmethod
    def _load(
        cls,
        root: Path,
        model_id: str,
        device: torch.device,
        dtype: str | torch.dtype | None,
        decode_attention: str = "auto",
    ) -> Blip2Engine:
        cfg = read_config(root / "config.json")
        dtype = resolve_dtype(dtype, device, t5=getattr(cfg, "is_encoder_decoder", False))
        model = load_model(root, dtype=dtype, device=device, decode_attention=decode_attention)
        tokenizer = TextTokenizer.from_dir(root)
        processor = ImageProcessor.from_dir(root, default_size=model.cfg.vision.image_size)
        log.info("loaded %s on %s as %s", model_id, device, dtype)
        return cls(model, tokenizer, processor, model_id)

    def retrieve(self, requests: list[RetrievalRequest]) -> list[RetrievalOutput]:
        """Answer retrieval requests offline, in one step (one vision batch)."""
        works = [RetrievalWork(i, r.task, r.image_key, r.texts) for i, r in enumerate(requests)]
        images = {r.image_key: r.pixel_values for r in requests if r.image_key}
        out = self.new_runner(1, 1, embedding_cache_bytes=0).run(StepPlan(images=images, retrievals=works))
        return [out.retrievals[i] for i in range(len(requests))]

    def match(self, image: Image.Image | torch.Tensor, texts: Sequence[str]) -> RetrievalOutput:
        """ITM probability and ITC similarity of each text with the image."""
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor.preprocess(image)
        return self.retrieve([self.retrieval_request("match", pixels, "image", texts)])[0]

    def run_scorings(self, requests: list[ScoringRequest], texts: list[list[str]]) -> list[ScoringResult]:
        """Score requests offline in one step (one vision batch); `texts`: each request's candidates."""
        works = [
            ScoringWork(i, r.image_key, r.text_ids, r.candidates, r.prefix_positions, r.source_positions)
            for i, r in enumerate(requests)
        ]
        images = {r.image_key: r.pixel_values for r in requests}
        out = self._runner_for(1, 1).run(StepPlan(images=images, scorings=works))
        return [self.scoring_result(r, texts[i], out.scorings[i]) for i, r in enumerate(requests)]

    def score(
        self, image: Image.Image | torch.Tensor, prompt: str | None, candidates: Sequence[str]
    ) -> ScoringResult:
        """Rank `candidates` as answers to `prompt` about `image` (None: as captions), best first:

        engine.score(img, "Question: what animal is it? Answer:", ["a cat", "a dog"]).text
        """
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor.preprocess(image)
        request = self.scoring_request(pixels, "image", prompt, candidates)
        return self.run_scorings([request], [list(candidates)])[0]

    def new_runner(
        self,
        num_slots: int,
        max_len: int,
        embedding_cache_bytes: int = 256 << 20,
        options: DecodeOptions | None = None,
    ) -> ModelRunner:
        max_len = min(max_len, self.max_positions)
        options = options or self.decode_options
        normalize = self.image_processor.normalize
        return ModelRunner(self.model, num_slots, max_len, embedding_cache_bytes, options, normalize)

    def _runner_for(self, num_slots: int, max_len: int) -> ModelRunner:
        """A runner for an offline call, kept for the next call that fits (and asks for the same
        `decode_options`): its KV cache (and on CUDA its captured graphs) are made once, not per call,
        as an `LLM` keeps its cache for its life."""
        kept = self._offline_runner
        if (
            kept is not None
            and kept.options == self.decode_options
            and kept.num_slots >= num_slots
            and kept.max_len >= min(max_len, self.max_positions)
        ):
            return kept
        runner = self.new_runner(num_slots, max_len, embedding_cache_bytes=0)
        self._offline_runner = runner
        return runner

    def generate(
        self,
        images: Sequence[Image.Image | torch.Tensor],
        prompts: Sequence[str | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for each (image, prompt) pair, all in one batch; results in input order."""
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(images)
        # Within one call, the same image object (several questions about it) runs the vision stage once.
        # Keyed by identity, not content: hashing every image would cost more than it saves here.
        pixels: dict[int, torch.Tensor] = {}
        for im in images:
            if id(im) not in pixels:
                pixels[id(im)] = im if isinstance(im, torch.Tensor) else self.image_processor.preprocess(im)
        requests = [
            self.request(pixels[id(im)], f"object:{id(im)}", pr, pa)
            for im, pr, pa in zip(images, prompts, plist, strict=True)
        ]
        return self.run_offline(requests)

    def run_offline(
        self,
        requests: list[GenerationRequest],
        on_step: Callable[[StepOutput], None] | None = None,
        overlap: bool | None = None,
    ) -> list[GenerationResult]:
        """All requests in one batch until each finishes; `on_step` sees every step's stage timings.
        `overlap` (default: `decode_options.overlap`, else on CUDA) launches each decode step before
        reading the last one's tokens when the batch allows it (`StepPlan.chainable`), as the serving
        loop does."""
        if not requests:
            return []
        from batching.engine_core import EngineCore  # batching builds on model: imported when used
        from batching.scheduler import Scheduler

        rows = sum(max(r.params.n, r.params.num_beams) for r in requests)
        runner = self._runner_for(rows, max(r.positions for r in requests))
        overlap = self.decode_options.overlap if overlap is None else overlap
        overlap = self.device.type == "cuda" if overlap is None else overlap
        # Every request admitted in the first step, its images one vision batch inside it.
        scheduler = Scheduler(rows, len(requests), len(requests), self.eos_ids, background_vision=False)
        loop = EngineCore(runner, scheduler, max_wait_ms=0, overlap=overlap, raise_errors=True)
        seqs = [loop.add(r) for r in requests]
        # Stop strings, read after each step as the server's engine client does.
        front = OfflineFrontEnd(self.tokenizer, requests, seqs, loop.cancel)

        def after_step(plan: object, out: StepOutput, sched: object) -> None:
            if on_step is not None:
                on_step(out)
            front.step()

        loop.on_step = after_step
        while loop.has_work:
            loop.step()
        return [
            self.result(r, outs, texts) for r, (outs, texts) in zip(requests, front.results(), strict=True)
        ]

    def caption(
        self, images: Sequence[Image.Image | torch.Tensor], params: SamplingParams | None = None
    ) -> list[str]:
        return [r.text for r in self.generate(images, None, params)]
