"""`Frontend`: what builds engine requests and reads their results, with no model behind it.

The HTTP process holds one (tokenizer, image processor and the checkpoint's `InputProcessor`): it
validates and tokenizes each request once and sends it to the engine process, which trusts it
(`model.request_checks` guards only the engine's own sizes). `Blip2Engine` is a `Frontend` with a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.config import Blip2Config, BlipConfig
from .data.image import ImageProcessor
from .data.textstream import cut_at_stop
from .decoding.generation import FinishReason, SamplingParams, TokenLogprob, TokenOutput
from .processing import InputProcessor, PromptInputs, needed_positions
from .runtime.plan import RetrievalRequest, ScoringOutput, ScoringRequest
from .runtime.scoring import ScoringResult, rank

__all__ = [
    "Completion",
    "Frontend",
    "GenerationRequest",
    "GenerationResult",
    "needed_positions",
]


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


class Frontend:
    """Requests of one checkpoint, built from its prompt rules (`processor`) and image processor."""

    def __init__(self, processor: InputProcessor, image_processor: ImageProcessor, model_id: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.cfg: Blip2Config | BlipConfig = processor.cfg
        self.eos_ids = processor.eos_ids

    @classmethod
    def from_dir(cls, root: str | Path, model_id: str) -> Frontend:
        """The frontend of the checkpoint in directory `root`: config, tokenizer and image processor
        files only (its weights are never read, no module is built)."""
        processor = InputProcessor.from_dir(root)
        images = ImageProcessor.from_dir(Path(root), default_size=processor.cfg.vision.image_size)
        return cls(processor, images, model_id)

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the checkpoint serves: "caption", "vqa" (generation) or "match", "embed" (retrieval)."""
        return self.processor.tasks

    @property
    def max_positions(self) -> int:
        """Positions of the text model: the language model's, or the retrieval text encoder's."""
        return self.processor.max_positions

    @property
    def vqa_template(self) -> str | None:
        """How a question is put to the model (the BLIP-2 paper's zero-shot VQA prompts; BLIP: bare)."""
        return self.processor.vqa_template

    def text_ids(self, prompt: str | None) -> list[int]:
        """Prompt ids as the model family takes them (`InputProcessor.text_ids`)."""
        return self.processor.text_ids(prompt)

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """The token history the decoder starts from (repetition penalty, positions)."""
        return self.processor.prompt_ids(text_ids)

    def image_key(self, pixel_values: torch.Tensor) -> str:
        # sha256 runs at ~1.4 GB/s here, blake2b at ~0.5: this hash is on the request path.
        return hashlib.sha256(pixel_values.numpy().tobytes()).hexdigest()

    def prepare(
        self, image: Image.Image | torch.Tensor, prompt: str | None, params: SamplingParams
    ) -> GenerationRequest:
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor.preprocess(image)
        return self.request(pixels, self.image_key(pixels), prompt, params)

    def request(
        self,
        pixels: torch.Tensor,
        image_key: str,
        prompt: str | None | PromptInputs,
        params: SamplingParams,
    ) -> GenerationRequest:
        """A request for preprocessed pixels whose content key the caller already has; `prompt`: text,
        or already tokenized (`InputProcessor.prompt`). ValueError for a prompt the model cannot take or
        one that, with max_new_tokens, passes its positions."""
        inputs = prompt if isinstance(prompt, PromptInputs) else self.processor.prompt(prompt)
        positions = self.processor.check_positions(inputs, params.max_new_tokens)
        return GenerationRequest(pixels, image_key, inputs.text_ids, inputs.prompt_ids, params, positions)

    def retrieval_request(
        self,
        task: str,
        pixels: torch.Tensor | None,
        image_key: str,
        texts: Sequence[str],
        max_tokens: int | None = None,
        names: Sequence[str] | None = None,
    ) -> RetrievalRequest:
        """A match (image + texts) or embed (image and/or texts) request for a retrieval checkpoint;
        ValueError naming the text (`names[i]`, the request's own field; default `texts[i]`) for one
        past `max_tokens` (its own tokens) or the model's positions."""
        names = names if names is not None else [f"texts[{i}]" for i in range(len(texts))]
        if "match" not in self.tasks:
            raise ValueError(f"model {self.model_id} does not match or embed: it serves {self.tasks}")
        if task == "match" and (pixels is None or not texts):
            raise ValueError("match needs an image and at least one text")
        ids = []
        for i, text in enumerate(texts):
            row, count = self.processor.retrieval_ids(text)
            if max_tokens is not None and count > max_tokens:
                raise ValueError(f"{names[i]}: longer than {max_tokens} tokens")
            ids.append(row)
        for i, row in enumerate(ids):
            if len(row) > self.max_positions:
                raise ValueError(f"{names[i]}: {len(row)} tokens, more than the model's {self.max_positions}")
        return RetrievalRequest(task, pixels, image_key if pixels is not None else "", ids)

    def scoring_request(
        self,
        pixels: torch.Tensor,
        image_key: str,
        prompt: str | None,
        candidates: Sequence[str],
        inputs: PromptInputs | None = None,
    ) -> ScoringRequest:
        """A request to score `candidates` given the image and the prompt (`model.runtime.scoring`;
        `inputs`: the prompt already tokenized); ValueError for a retrieval model, no candidates, a
        blank one, or one past the model's positions."""
        if not self.processor.generates:
            raise ValueError(f"model {self.model_id} generates no text to score: it serves {self.tasks}")
        if not candidates:
            raise ValueError("candidates: give at least one")
        inputs = inputs or self.processor.prompt(prompt)
        prefix = len(inputs.prompt_ids)
        ids = [self.processor.candidate_ids(prompt, c) for c in candidates]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"candidates[{i}]: empty")
            if max(prefix + len(row), inputs.prompt_tokens) > self.max_positions:
                raise ValueError(
                    f"candidates[{i}]: the prompt ({prefix} positions) and its {len(row)} tokens exceed "
                    f"the model's {self.max_positions} positions"
                )
        return ScoringRequest(pixels, image_key, inputs.text_ids, ids, prefix, inputs.prompt_tokens)

    def scoring_result(
        self, request: ScoringRequest, texts: Sequence[str], output: ScoringOutput
    ) -> ScoringResult:
        """The candidates ranked by their summed log-probability (`ScoringOutput` -> `ScoringResult`)."""
        return rank(list(texts), output, request.source_positions)

    def completion(self, out: TokenOutput, request: GenerationRequest, text: str | None = None) -> Completion:
        """Text of one output, decoded after the request's prompt (`TextTokenizer.decode`); a stop
        string (seen in a beam hypothesis too) cuts it and means "stop". `text`: already made so (by
        `model.data.detokenizer.RequestText`, with `out` cut and its finish reason set there)."""
        if text is not None:
            return Completion(text, out.tokens, out.finish_reason or FinishReason.LENGTH, out.logprobs)
        text = self.tokenizer.decode(out.tokens, request.prompt_ids)
        text, stopped = cut_at_stop(text, request.params.stop)
        reason = FinishReason.STOP if stopped else out.finish_reason or FinishReason.LENGTH
        return Completion(text, out.tokens, reason, out.logprobs)

    def result(
        self, request: GenerationRequest, outputs: list[TokenOutput], texts: list[str] | None = None
    ) -> GenerationResult:
        """Texts of a finished request's token outputs (`texts`: made as the tokens came, one each)."""
        made = texts if texts is not None else [None] * len(outputs)
        completions = [self.completion(out, request, t) for out, t in zip(outputs, made, strict=True)]
        return GenerationResult(completions, prompt_tokens=self.processor.prompt_tokens(request.text_ids))
