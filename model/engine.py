"""`Blip2Engine`: the Python API over model, tokenizer and image processor.

    engine = Blip2Engine.from_pretrained("Salesforce/blip2-opt-2.7b", device="cuda", dtype="float16")
    engine.caption([image])                                  # ["two cats laying on a couch"]
    engine.generate([image], ["Question: how many cats? Answer:"], SamplingParams(num_beams=5))

`generate` batches everything it is given (one vision batch, one prefill, a shared decode batch that
sequences leave as they finish) through the server's own scheduler and engine loop, in-process: it adds
its requests and steps the loop until they finish (nano-vllm's `LLM.generate`).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.config import read_config
from .checkpoint.loader import build_empty, load_model, resolve_checkpoint
from .checkpoint.tiny import write_tiny_checkpoint
from .data.image import ImageProcessor
from .data.textstream import cut_at_stop, stop_checker
from .data.tokenizer import TextTokenizer
from .decoding.generation import FinishReason, SamplingParams, StopCheck, TokenLogprob, TokenOutput
from .placement import parse_dtype, resolve_device, resolve_dtype
from .runtime.options import DecodeOptions
from .runtime.plan import (
    RetrievalOutput,
    RetrievalRequest,
    RetrievalWork,
    ScoringOutput,
    ScoringRequest,
    ScoringWork,
    StepOutput,
    StepPlan,
)
from .runtime.runner import ModelRunner
from .runtime.scoring import ScoringResult, candidate_ids, rank

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"


@dataclass
class GenerationRequest:
    """A request ready for the scheduler: preprocessed image and tokenized prompt."""

    # [3, H, W] float32 on the CPU, or [H, W, 3] uint8 before normalising (`ImageProcessor.rgb`).
    pixel_values: torch.Tensor
    image_key: str  # content hash of pixel_values: equal images share one vision pass
    text_ids: list[int]  # prompt ids after the image placeholders (BOS first)
    # The decoder's token history: placeholders + text_ids for OPT; Flan-T5's decoder start token alone.
    prompt_ids: list[int]
    params: SamplingParams
    stop_check: StopCheck | None = None  # set when params.stop has stop strings
    # Cache positions the request needs: its prompt and answer but the answer's last token (Flan-T5:
    # the longer of the encoder's input and the decoder's start token + answer; `needed_positions`).
    positions: int = 0
    # Admission order among waiting requests: higher first, FIFO within one (`batching.scheduler`).
    priority: int = 0


@dataclass
class Completion:
    """One output: text (cut before any stop string), its token ids, why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason  # stop | length
    logprobs: list[TokenLogprob] | None = None  # one per token id, when requested


@dataclass
class GenerationResult:
    outputs: list[Completion]  # n of them, the best first for beams
    prompt_tokens: int

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason:
        return self.outputs[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def needed_positions(prompt: int, max_new_tokens: int) -> int:
    """Positions a sequence of `prompt` tokens takes in the decoder's cache (and position embeddings)
    to generate `max_new_tokens`: each new token but the last is fed back (as in transformers, whose
    `generate` never runs the model on its final token), so prompt + max_new_tokens - 1."""
    return prompt + max_new_tokens - 1


class Blip2Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        image_processor: ImageProcessor,
        model_id: str,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.cfg = model.cfg
        self.device = model.device
        self.dtype = model.lm_dtype
        self.eos_ids = self.cfg.eos_token_ids
        self.decode_options = DecodeOptions()
        # Offline calls keep their runner (its cache, its captured graphs) while it fits.
        self._offline_runner: ModelRunner | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = TINY_RANDOM,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> Blip2Engine:
        """A hub id, a local checkpoint directory or "tiny-random", loaded on `device` ("cpu", "cuda",
        "cuda:N", "auto") in `dtype` ("float32", "float16", "bfloat16", "auto" / None: float32 on the CPU;
        on CUDA bfloat16 for Flan-T5, else float16; see `model.placement`).

        Raises ValueError naming `device` or `dtype` when it is not one or CUDA is not available, before
        anything is fetched."""
        where, _ = resolve_device(device), parse_dtype(dtype)
        if model_id == TINY_RANDOM:
            with tempfile.TemporaryDirectory(prefix="blipserve-tiny-") as tmp:
                return cls._load(write_tiny_checkpoint(tmp), TINY_RANDOM, where, dtype)
        return cls._load(resolve_checkpoint(model_id), model_id, where, dtype)

    @classmethod
    def load_dir(
        cls,
        root: Path,
        model_id: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> Blip2Engine:
        """The checkpoint in local directory `root`, served under the name `model_id` (`device` and
        `dtype` as `from_pretrained`'s)."""
        where, _ = resolve_device(device), parse_dtype(dtype)
        return cls._load(root, model_id, where, dtype)

    @classmethod
    def _load(
        cls, root: Path, model_id: str, device: torch.device, dtype: str | torch.dtype | None
    ) -> Blip2Engine:
        cfg = read_config(root / "config.json")
        dtype = resolve_dtype(dtype, device, t5=getattr(cfg, "is_encoder_decoder", False))
        model = load_model(root, dtype=dtype, device=device)
        tokenizer = TextTokenizer.from_dir(root)
        processor = ImageProcessor.from_dir(root, default_size=model.cfg.vision.image_size)
        log.info("loaded %s on %s as %s", model_id, device, dtype)
        return cls(model, tokenizer, processor, model_id)

    @classmethod
    def frontend(cls, root: Path, model_id: str) -> Blip2Engine:
        """Tokenizer, image processor and prompt rules of a checkpoint without its weights (the modules
        live on the meta device): what an HTTP process needs to build requests for an engine process
        and to turn its token ids into text. Running the model on it fails."""
        cfg = read_config(root / "config.json")
        model = build_empty(cfg, torch.float32, torch.device("meta"))
        tokenizer = TextTokenizer.from_dir(root)
        processor = ImageProcessor.from_dir(root, default_size=cfg.vision.image_size)
        return cls(model, tokenizer, processor, model_id)

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the checkpoint serves: "caption", "vqa" (generation) or "match", "embed" (retrieval)."""
        return self.model.tasks

    @property
    def max_positions(self) -> int:
        """Positions of the text model: the language model's, or the retrieval text encoder's."""
        return getattr(self.model, "max_text_positions", None) or self.cfg.max_text_positions

    def retrieval_request(
        self, task: str, pixels: torch.Tensor | None, image_key: str, texts: Sequence[str]
    ) -> RetrievalRequest:
        """A match (image + texts) or embed (image and/or texts) request for a retrieval checkpoint."""
        if "match" not in self.tasks:
            raise ValueError(f"model {self.model_id} does not match or embed: it serves {self.tasks}")
        if task == "match" and (pixels is None or not texts):
            raise ValueError("match needs an image and at least one text")
        ids = [self.model.text_ids(self.tokenizer.encode, t) for t in texts]
        for i, row in enumerate(ids):
            if len(row) > self.max_positions:
                raise ValueError(f"texts[{i}]: {len(row)} tokens, more than the model's {self.max_positions}")
        return RetrievalRequest(task, pixels, image_key if pixels is not None else "", ids)

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

    def scoring_request(
        self, pixels: torch.Tensor, image_key: str, prompt: str | None, candidates: Sequence[str]
    ) -> ScoringRequest:
        """A request to score `candidates` given the image and the prompt (`model.runtime.scoring`);
        ValueError for a retrieval model, no candidates, a blank one, or one past the model's positions."""
        if "caption" not in self.tasks and "vqa" not in self.tasks:
            raise ValueError(f"model {self.model_id} generates no text to score: it serves {self.tasks}")
        if not candidates:
            raise ValueError("candidates: give at least one")
        text_ids = self.text_ids(prompt)
        prefix = len(self.prompt_ids(text_ids))
        ids = [candidate_ids(self.model, self.tokenizer, prompt, c) for c in candidates]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"candidates[{i}]: empty")
            if max(prefix + len(row), self.model.prompt_tokens(text_ids)) > self.max_positions:
                raise ValueError(
                    f"candidates[{i}]: the prompt ({prefix} positions) and its {len(row)} tokens exceed "
                    f"the model's {self.max_positions} positions"
                )
        return ScoringRequest(pixels, image_key, text_ids, ids)

    def run_scorings(self, requests: list[ScoringRequest], texts: list[list[str]]) -> list[ScoringResult]:
        """Score requests offline in one step (one vision batch); `texts`: each request's candidates."""
        works = [ScoringWork(i, r.image_key, r.text_ids, r.candidates) for i, r in enumerate(requests)]
        images = {r.image_key: r.pixel_values for r in requests}
        out = self._runner_for(1, 1).run(StepPlan(images=images, scorings=works))
        return [self.scoring_result(r, texts[i], out.scorings[i]) for i, r in enumerate(requests)]

    def scoring_result(
        self, request: ScoringRequest, texts: Sequence[str], output: ScoringOutput
    ) -> ScoringResult:
        """The candidates ranked by their summed log-probability (`ScoringOutput` -> `ScoringResult`)."""
        return rank(list(texts), output, self.model.prompt_tokens(request.text_ids))

    def score(
        self, image: Image.Image | torch.Tensor, prompt: str | None, candidates: Sequence[str]
    ) -> ScoringResult:
        """Rank `candidates` as answers to `prompt` about `image` (None: as captions), best first:

        engine.score(img, "Question: what animal is it? Answer:", ["a cat", "a dog"]).text
        """
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor.preprocess(image)
        request = self.scoring_request(pixels, "image", prompt, candidates)
        return self.run_scorings([request], [list(candidates)])[0]

    def text_ids(self, prompt: str | None) -> list[int]:
        """Prompt ids as the model family takes them (see each model's `text_ids`)."""
        return self.model.text_ids(self.tokenizer.encode, prompt)

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """The token history the decoder starts from (repetition penalty, positions)."""
        return self.model.prompt_ids(text_ids)

    def image_key(self, pixel_values: torch.Tensor) -> str:
        # sha256 runs at ~1.4 GB/s here, blake2b at ~0.5: this hash is on the request path.
        return hashlib.sha256(pixel_values.numpy().tobytes()).hexdigest()

    def prepare(
        self, image: Image.Image | torch.Tensor, prompt: str | None, params: SamplingParams
    ) -> GenerationRequest:
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor.preprocess(image)
        return self.request(pixels, self.image_key(pixels), prompt, params)

    def request(
        self, pixels: torch.Tensor, image_key: str, prompt: str | None, params: SamplingParams
    ) -> GenerationRequest:
        """A request for preprocessed pixels whose content key the caller already has."""
        text_ids = self.text_ids(prompt)
        prompt_ids = self.prompt_ids(text_ids)
        encoder = self.model.prompt_tokens(text_ids)
        positions = max(needed_positions(len(prompt_ids), params.max_new_tokens), encoder)
        if positions > self.max_positions:
            raise ValueError(
                f"prompt ({encoder} positions) + max_new_tokens ({params.max_new_tokens}) - 1 "
                f"exceeds the model's {self.max_positions} positions (the last new token takes none)"
            )
        check = stop_checker(self.tokenizer.continuation(prompt_ids), params.stop) if params.stop else None
        return GenerationRequest(pixels, image_key, text_ids, prompt_ids, params, check, positions)

    def completion(self, out: TokenOutput, request: GenerationRequest) -> Completion:
        """Text of one output, decoded after the request's prompt (`TextTokenizer.decode`); a stop
        string (seen in a beam hypothesis too) cuts it and means "stop"."""
        text = self.tokenizer.decode(out.tokens, request.prompt_ids)
        text, stopped = cut_at_stop(text, request.params.stop)
        reason = FinishReason.STOP if stopped else out.finish_reason or FinishReason.LENGTH
        return Completion(text, out.tokens, reason, out.logprobs)

    def result(self, request: GenerationRequest, outputs: list[TokenOutput]) -> GenerationResult:
        """Texts of a finished request's token outputs."""
        completions = [self.completion(out, request) for out in outputs]
        return GenerationResult(completions, prompt_tokens=self.model.prompt_tokens(request.text_ids))

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
        from batching.engine_loop import EngineLoop  # batching builds on model: imported when used
        from batching.scheduler import Scheduler

        rows = sum(max(r.params.n, r.params.num_beams) for r in requests)
        runner = self._runner_for(rows, max(r.positions for r in requests))
        overlap = self.decode_options.overlap if overlap is None else overlap
        overlap = self.device.type == "cuda" if overlap is None else overlap
        # Every request admitted in the first step, its images one vision batch inside it.
        scheduler = Scheduler(rows, len(requests), len(requests), self.eos_ids, background_vision=False)
        hook = None if on_step is None else (lambda plan, out, sched: on_step(out))
        loop = EngineLoop(runner, scheduler, max_wait_ms=0, on_step=hook, overlap=overlap, raise_errors=True)
        seqs = [loop.add(r) for r in requests]
        while loop.has_work:
            loop.step()
        return [self.result(r, s.outputs()) for r, s in zip(requests, seqs, strict=True)]

    def caption(
        self, images: Sequence[Image.Image | torch.Tensor], params: SamplingParams | None = None
    ) -> list[str]:
        return [r.text for r in self.generate(images, None, params)]
