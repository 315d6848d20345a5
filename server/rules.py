"""This server's rules for a request, and the engine request built from it: the task served, the
generation settings within the server's limits, item counts, prompt length and positions. Every
refusal is an `ApiError` naming the field as the route's user sent it."""

from __future__ import annotations

from model.decoding.generation import SamplingError, SamplingParams
from model.frontend import Frontend, GenerationRequest
from model.runtime.plan import RetrievalRequest

from .errors import ApiError, Names, in_users_words, named
from .inputs import Prepared
from .schemas import GenerationParams
from .settings import Settings


def limit_items(count: int, field: str, settings: Settings) -> None:
    """422 when a batch request carries more than `max_items_per_request` of `field`."""
    if count > settings.max_items_per_request:
        limit = settings.max_items_per_request
        raise ApiError(422, f"{field}: at most {limit} per request", param=field)


class RequestRules:
    """Validates a request's fields against this server (`settings`) and the loaded checkpoint
    (`engine`: its tasks, prompt rules and positions), and builds the engine request from them."""

    def __init__(self, settings: Settings, engine: Frontend):
        self.settings = settings
        self.engine = engine
        self.max_len = min(settings.max_len, engine.max_positions)

    @property
    def vqa_template(self) -> str:
        """The prompt template of /vqa questions: the setting's, else the checkpoint's."""
        return self.settings.vqa_template or self.engine.vqa_template

    def require(self, task: str, route: str) -> None:
        """400 when the loaded checkpoint does not do `task` (a VQA model asked for a caption...)."""
        tasks = self.engine.tasks
        if task not in tasks:
            raise ApiError(
                400,
                f"{route}: model {self.engine.model_id} does not serve {task!r} (it serves: "
                f"{', '.join(tasks)})",
                code="unsupported_task",
            )

    def limit_items(self, count: int, field: str) -> None:
        """422 when a batch request carries more than `max_items_per_request` of `field`."""
        limit_items(count, field, self.settings)

    def sampling_params(
        self, p: GenerationParams, task: str = "caption", names: Names | None = None
    ) -> SamplingParams:
        """The request's generation settings within this server's limits; 422 naming the field as the
        route's user sent it (`names`: {our field: theirs}, where they differ)."""
        s = self.settings
        default = s.vqa_max_new_tokens if task == "vqa" and s.vqa_max_new_tokens else None
        max_new = p.max_new_tokens or default or s.default_max_new_tokens
        beams = p.num_beams or s.default_num_beams

        def refuse(field: str, problem: str) -> ApiError:
            name = named(field, names)
            return ApiError(422, f"{name}: {in_users_words(problem, names)}", param=name)

        if max_new > s.max_new_tokens_limit:
            raise refuse("max_new_tokens", f"at most {s.max_new_tokens_limit} on this server")
        if beams > s.max_beams:
            raise refuse("num_beams", f"at most {s.max_beams} on this server")
        if p.n > s.max_n:
            raise refuse("n", f"at most {s.max_n} on this server")
        fields = p.model_dump(
            exclude={"max_new_tokens", "num_beams", "stream", "stop"},
            include=set(GenerationParams.model_fields),
        )
        stop = tuple(p.stop or ())
        try:  # the rules of the settings together (min_new_tokens, do_sample, n) are SamplingParams'
            return SamplingParams(max_new_tokens=max_new, num_beams=beams, stop=stop, **fields)
        except SamplingError as exc:
            raise refuse(exc.field, exc.problem) from None

    def make_request(
        self,
        image: Prepared,
        prompt: str | None,
        params: SamplingParams,
        names: Names | None = None,
        priority: int = 0,
    ) -> GenerationRequest:
        """The engine request; 422 when the prompt is too long, naming the fields as the route's user
        sent them (`names`: e.g. {"prompt": "question"} on /vqa); `priority`: the scheduler admits
        higher ones first (see `batching.scheduler`)."""
        where = named("prompt", names)
        try:  # tokenized once, here: the engine takes the ids as they are
            inputs = self.engine.processor.prompt(prompt)
            if prompt is not None and inputs.text_tokens > self.settings.max_prompt_tokens:
                raise ValueError(f"prompt: longer than {self.settings.max_prompt_tokens} tokens")
            request = self.engine.request(image.pixel_values, image.key, inputs, params)
        except ValueError as exc:  # in the Python API's words ("prompt", "max_new_tokens")
            raise ApiError(422, in_users_words(str(exc), names), param=where) from None
        if request.positions > self.max_len:
            problem = f"prompt + max_new_tokens exceed this server's {self.max_len} positions"
            raise ApiError(422, in_users_words(problem, names), param=where)
        request.priority = priority
        return request

    def retrieval_request(self, task: str, image: Prepared | None, texts: list[str]) -> RetrievalRequest:
        """A /match or /embed engine request ("match" | "embed") for `image` (None: texts only) and
        `texts`; 422 when a text is longer than `max_prompt_tokens`."""
        pixels, key = (image.pixel_values, image.key) if image is not None else (None, "")
        try:
            limit = self.settings.max_prompt_tokens
            return self.engine.retrieval_request(task, pixels, key, texts, limit)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
