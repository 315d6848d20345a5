"""Request and response bodies of the HTTP API (also its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.decoding.generation import MAX_NO_REPEAT_NGRAM, MIN_DIVISOR


class GenerationParams(BaseModel):
    """Generation settings; every one optional, bounded by the server's limits (see /v1/models)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="default: the server's (30)")
    min_new_tokens: int = Field(0, ge=0)
    num_beams: int | None = Field(None, ge=1, description="1 = greedy (default); the paper captions with 5")
    length_penalty: float = Field(1.0, ge=-10, le=10)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=MIN_DIVISOR, le=10)
    top_k: int = Field(50, ge=0, le=10_000)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=MIN_DIVISOR, le=10)
    no_repeat_ngram_size: int = Field(
        0, ge=0, le=MAX_NO_REPEAT_NGRAM, description="no n-gram of this many tokens twice (0: off)"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, description="outputs per image: the n best beams (num_beams >= n) or n samples")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="per token: its log-probability and this many top alternatives"
    )
    stop: list[str] | None = Field(
        None, max_length=4, description="up to 4 strings; generation ends at one, cut from the text"
    )
    stream: bool = Field(False, description="Server-Sent Events: text deltas, then a final event")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s or len(s) > 100 for s in value):
            raise ValueError("each stop string must be 1 to 100 characters")
        return value


class ImageInput(GenerationParams):
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1, description="batch form: results come in this order")

    @model_validator(mode="after")
    def _one_image_field(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        return self


class CaptionRequest(ImageInput):
    prompt: str | None = Field(None, max_length=4000, description="conditional captioning: text to continue")


class VQARequest(ImageInput):
    question: str | None = Field(None, min_length=1, max_length=4000)
    questions: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_question_field(self):
        if (self.question is None) == (self.questions is None):
            raise ValueError("give exactly one of 'question' or 'questions'")
        if self.questions is not None and any(not q or len(q) > 4000 for q in self.questions):
            raise ValueError("each question must be 1 to 4000 characters")
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


class Item(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    choices: list[Choice] | None = Field(None, description="with n > 1 or logprobs")


class CaptionResponse(BaseModel):
    model: str
    caption: str | None = Field(None, description="single form")
    captions: list[Item] | None = Field(None, description="batch form, in request order")
    finish_reason: str | None = None
    choices: list[Choice] | None = Field(None, description="single form with n > 1 or logprobs")
    usage: Usage
    timings: Timings


class VQAResponse(BaseModel):
    model: str
    answer: str | None = Field(None, description="single form")
    answers: list[Item] | None = Field(None, description="batch form, in request order")
    finish_reason: str | None = None
    choices: list[Choice] | None = Field(None, description="single form with n > 1 or logprobs")
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class MatchRequest(BaseModel):
    """Score texts against an image (or each of a batch of images)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1, description="batch form: each image gets all texts")
    texts: list[str] = Field(min_length=1, max_length=64, description="captions to score against the image")

    @model_validator(mode="after")
    def _check(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        if any(not t or len(t) > 4000 for t in self.texts):
            raise ValueError("each text must be 1 to 4000 characters")
        return self


class EmbedRequest(BaseModel):
    """Normalised embeddings of images and/or texts, in one shared space."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 image bytes, or a data: URL")
    images: list[str] | None = Field(None, min_length=1)
    texts: list[str] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _check(self):
        if self.image is not None and self.images is not None:
            raise ValueError("give at most one of 'image' or 'images'")
        if self.image is None and self.images is None and not self.texts:
            raise ValueError("give an image ('image' or 'images') and/or 'texts'")
        if any(not t or len(t) > 4000 for t in self.texts or []):
            raise ValueError("each text must be 1 to 4000 characters")
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
