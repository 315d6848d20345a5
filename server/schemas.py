"""Request and response bodies of the HTTP API (also its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from model.decoding.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS, SAMPLING_BOUNDS

# Each setting's range, as `SamplingParams` checks it (one source for both).
_B = {name: bound.kwargs() for name, bound in SAMPLING_BOUNDS.items()}

# A question or text in a list: each item is checked, and an error names it (`questions[1]`).
Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]


class GenerationParams(BaseModel):
    """Generation settings; every one optional, bounded by the server's limits (see /v1/models)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int | None = Field(None, **_B["max_new_tokens"], description="default: the server's (30)")
    min_new_tokens: int = Field(0, **_B["min_new_tokens"])
    num_beams: int | None = Field(
        None, **_B["num_beams"], description="1 = greedy (default); the paper captions with 5"
    )
    length_penalty: float = Field(1.0, **_B["length_penalty"])
    do_sample: bool = False
    temperature: float = Field(1.0, **_B["temperature"])
    top_k: int = Field(50, **_B["top_k"])
    top_p: float = Field(1.0, **_B["top_p"])
    repetition_penalty: float = Field(1.0, **_B["repetition_penalty"])
    no_repeat_ngram_size: int = Field(
        0, **_B["no_repeat_ngram_size"], description="no n-gram of this many tokens twice (0: off)"
    )
    seed: int | None = Field(None, **_B["seed"])
    n: int = Field(
        1, **_B["n"], description="outputs per image: the n best beams (num_beams >= n) or n samples"
    )
    logprobs: int | None = Field(
        None, **_B["logprobs"], description="per token: its log-probability and this many top alternatives"
    )
    stop: list[str] | None = Field(
        None,
        max_length=MAX_STOP_STRINGS,
        description=f"up to {MAX_STOP_STRINGS} strings; generation ends at one, cut from the text",
    )
    stream: bool = Field(False, description="Server-Sent Events: text deltas, then a final event")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s or len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
        return value


PRIORITY = Field(
    0,
    ge=-1000,
    le=1000,
    description="admission order when requests wait for the engine: higher first, FIFO within one; "
    "lower runs later (batch jobs send -10, so online traffic at the default 0 goes ahead of them)",
)


class ImageInput(GenerationParams):
    priority: int = PRIORITY
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1, description="batch form: results come in this order")
    candidates: list[str] | None = Field(
        None,
        min_length=1,
        description="score these answers (1 to 4000 characters each) instead of generating; "
        "ranked best first, the best is the answer",
    )

    @field_validator("candidates")
    @classmethod
    def _candidate_texts(cls, value: list[str] | None) -> list[str] | None:
        for i, text in enumerate(value or []):
            if not text.strip() or len(text) > 4000:
                raise ValueError(f"each must be 1 to 4000 characters and not blank; [{i}] is not")
        return value

    @model_validator(mode="after")
    def _one_image_field(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        return self


class CaptionRequest(ImageInput):
    prompt: str | None = Field(None, max_length=4000, description="conditional captioning: text to continue")


class VQARequest(ImageInput):
    question: str | None = Field(
        None,
        min_length=1,
        max_length=4000,
        description="put into the VQA template (see /v1/models), unless it is in the template's shape "
        "already ('Question: ... Answer:')",
    )
    questions: list[Text] | None = Field(None, min_length=1, description="several questions, as 'question'")
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=4000,
        description="raw form: the whole prompt, sent without the template",
    )

    @model_validator(mode="after")
    def _one_question_field(self):
        if sum(x is not None for x in (self.question, self.questions, self.prompt)) != 1:
            raise ValueError("give exactly one of 'question', 'questions' or 'prompt'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    queue_ms: float
    total_ms: float


class TopLogprob(BaseModel):
    id: int
    token: str = Field(description="the token's bytes as UTF-8 (U+FFFD for part of a character)")
    logprob: float


class Logprob(TopLogprob):
    top: list[TopLogprob] = Field(description="the most likely tokens at this position, best first")


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: str = Field(description="stop (EOS or a stop string) or length")
    logprobs: list[Logprob] | None = None


class CandidateScore(BaseModel):
    index: int = Field(description="index into the request's 'candidates'")
    text: str
    logprob: float = Field(description="sum of its tokens' log-probabilities given the image and prompt")
    mean_logprob: float = Field(description="logprob / tokens")
    tokens: int = Field(description="tokens scored (with the end token for Flan-T5 and BLIP VQA)")


class Item(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    choices: list[Choice] | None = Field(None, description="with n > 1 or logprobs")
    candidates: list[CandidateScore] | None = Field(None, description="with candidates: ranked, best first")


class CaptionResponse(BaseModel):
    model: str
    caption: str | None = Field(None, description="single form")
    captions: list[Item] | None = Field(None, description="batch form, in request order")
    finish_reason: str | None = None
    choices: list[Choice] | None = Field(None, description="single form with n > 1 or logprobs")
    candidates: list[CandidateScore] | None = Field(None, description="single form with candidates")
    usage: Usage
    timings: Timings


class VQAResponse(BaseModel):
    model: str
    answer: str | None = Field(None, description="single form")
    answers: list[Item] | None = Field(None, description="batch form, in request order")
    finish_reason: str | None = None
    choices: list[Choice] | None = Field(None, description="single form with n > 1 or logprobs")
    candidates: list[CandidateScore] | None = Field(None, description="single form with candidates")
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class MatchRequest(BaseModel):
    """Score texts against an image (or each of a batch of images)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1, description="batch form: each image gets all texts")
    texts: list[Text] = Field(min_length=1, max_length=64, description="captions to score against the image")

    @model_validator(mode="after")
    def _check(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        return self


class EmbedRequest(BaseModel):
    """Normalised embeddings of images and/or texts, in one shared space."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image_optional: ClassVar[bool] = True  # texts alone are a request (a multipart form without a file too)
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1)
    texts: list[Text] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _check(self):
        if self.image is not None and self.images is not None:
            raise ValueError("give at most one of 'image' or 'images'")
        if self.image is None and self.images is None and not self.texts:
            raise ValueError("give an image ('image' or 'images') and/or 'texts'")
        return self


class RetrievalTimings(BaseModel):
    total_ms: float


class Score(BaseModel):
    text: int = Field(description="index into 'texts'")
    itm: float = Field(description="image-text matching head: probability that the text matches")
    itc: float = Field(description="contrastive similarity (cosine; BLIP-2: the best of its queries)")


class MatchResponse(BaseModel):
    model: str
    scores: list[Score] | None = Field(None, description="single form")
    matches: list[list[Score]] | None = Field(None, description="batch form: one list per image")
    timings: RetrievalTimings


class EmbedResponse(BaseModel):
    model: str
    dimensions: int
    image_embeddings: list[list[list[float]]] = Field(
        description="per image, its embeddings (BLIP-2: one per query, 32; BLIP: 1); "
        "its similarity to a text is the largest dot product"
    )
    text_embeddings: list[list[float]]
    timings: RetrievalTimings
