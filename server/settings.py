"""Server settings: command-line flags win over environment (BLIPSERVE_*), which win over a preset file."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
try:
    VERSION = importlib.metadata.version("blipserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "0.0.0+source"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLIPSERVE_", extra="forbid", allow_inf_nan=False)

    # Model
    model: str = Field("tiny-random", description="hub id, local directory, or 'tiny-random'")
    revision: str | None = Field(
        None, description="hub revision of --model (branch, tag or commit hash); unset: the main branch"
    )
    served_model_name: list[str] = Field(
        default_factory=list,
        description="names the model is served under: the first is the id in /v1/models and in responses, "
        "any is accepted as a chat request's `model`; none: --model",
    )
    device: str = Field("auto", description="cuda, cuda:N, cpu, or auto (cuda when present)")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="weights and activations; auto: float32 on the CPU; on CUDA bfloat16 for Flan-T5 (its "
        "activations overflow float16), float16 for the others",
    )
    quantize: Literal["none", "int8", "llm.int8"] = Field(
        "none",
        description="int8: weight-only int8 (per-row scales) of the language model's layer linears; "
        "llm.int8: bitsandbytes LLM.int8 of the ViT's and OPT's linears (CUDA; slower than fp16)",
    )
    engine: Literal["process", "thread"] = Field(
        "process",
        description="process: scheduler, runner and model in an engine process of their own (serving); "
        "thread: in the HTTP process (tests, debugging)",
    )
    api_workers: int = Field(
        1, ge=1, le=64, description="HTTP processes in front of the engine process (engine: process)"
    )
    engine_threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads of the engine process; 0: the cores the HTTP processes leave (the "
        "HTTP processes take one torch thread each: more would only spin against the engine's)",
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="engine processes (--dp), each with its own model, KV cache, scheduler and queue, on "
        "--devices; --max-running-seqs and --max-queue are per engine. The HTTP processes send each request "
        "to the least loaded engine; one that dies is restarted while the others serve",
    )
    devices: list[str] = Field(
        default_factory=list,
        description="one device per engine (--dp), e.g. cuda:0,cuda:1 (the same one twice: two engines on "
        "it); none: cuda:0..N-1 when CUDA is present (or --device cuda), else the CPU, N engines sharing "
        "its cores",
    )
    dp_routing: Literal["load", "image-affinity"] = Field(
        "load",
        description="how the HTTP processes pick an engine (--dp > 1): load: the least loaded (ties rotate); "
        "image-affinity: the engine an image's key hashes to (rendezvous hashing, so /vqa follow-ups hit its "
        "vision cache) unless that one is clearly busier than the least loaded",
    )
    min_ready_engines: int = Field(
        1, ge=1, description="/ready is 200 while at least this many engines are up (--dp > 1)"
    )
    engine_restart_limit: int = Field(
        3,
        ge=1,
        description="with --dp > 1 a dead engine is restarted; this many deaths of one engine within "
        "--engine-restart-window-s end the server (exit status 1) for its supervisor",
    )
    engine_restart_window_s: float = Field(60.0, gt=0, description="see --engine-restart-limit")
    # HTTP
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    root_path: str = Field(
        "",
        description="path prefix under which a reverse proxy serves this server, stripping it from requests "
        "(e.g. /blip): the OpenAPI schema and /docs name it",
    )
    ssl_keyfile: str | None = Field(None, description="TLS private key (PEM): serve HTTPS")
    ssl_certfile: str | None = Field(None, description="TLS certificate chain (PEM) for --ssl-keyfile")
    access_log_exclude: list[str] = Field(
        default_factory=list,
        description="paths whose requests get no access-log line (still counted in /metrics), e.g. "
        "/health,/ready,/metrics for probes and scrapes",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="debug: tracebacks too"
    )
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line")
    graceful_timeout_s: float = Field(30.0, gt=0, description="drain time on SIGTERM")
    otlp_traces_endpoint: str | None = Field(
        None,
        description="trace requests with OpenTelemetry: spans go over OTLP/HTTP to this URL (e.g. "
        "http://collector:4318/v1/traces; a URL without a path gets /v1/traces); the OTEL_EXPORTER_OTLP_* "
        "(headers, timeout, compression, certificates) and OTEL_SERVICE_NAME variables apply; unset: no "
        "tracing. Needs pip install 'blipserve[otel]'",
    )
    # Batching
    max_batch_images: int = Field(32, ge=1, description="new images per vision batch")
    background_vision: bool | None = Field(
        None,
        description="encode newcomers' images on a worker thread (CUDA: its own stream) while running "
        "sequences decode; false: inside the engine step, which every running sequence then waits for; "
        "unset: true on CUDA, false on the CPU (where both would share the same cores: measured no gain)",
    )
    overlap: bool | None = Field(
        None,
        description="launch the next decode step before reading this one's tokens back, so the host's work "
        "per step runs while the device computes (plain greedy and sampled requests); unset: true on CUDA, "
        "false on the CPU (where launching is computing: only a step of delay to each result)",
    )
    raw_pixels: bool | None = Field(
        None,
        description="HTTP processes send pixels before normalising (uint8, a quarter of the bytes) and the "
        "engine normalises them on its device; unset: true on CUDA, false on the CPU (where the engine "
        "process would only take over the HTTP processes' work)",
    )
    qformer_precision: Literal["auto", "float32", "tf32", "model"] = Field(
        "auto",
        description="the Q-Former's arithmetic (BLIP-2 caption/vqa): auto as transformers (float32 in a "
        "float16 model, else the model dtype); float32; tf32: its matrix products on the tensor cores "
        "(CUDA); model: in the model dtype. Measured on the test checkpoints in fp16, model dtype changed 5% "
        "of greedy tokens against float32",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="an idle engine waits this long for more requests to fill a vision batch (0: starts at "
        "once; measured: 5 ms added 5-6 ms to the p50 of a lone request and nothing to throughput at 16-64)",
    )
    max_running_seqs: int = Field(64, ge=1, description="KV-cache slots (a beam takes one), per engine")
    max_queue: int = Field(
        256, ge=1, description="waiting requests before 429, per engine (--dp: 429 once every one is full)"
    )
    embedding_cache_mb: int = Field(256, ge=0, description="LRU of image query embeddings")
    cuda_graphs: bool = Field(
        True,
        description="capture decode steps, prefills and vision batches as CUDA graphs at start-up and "
        "replay them (one launch per step); CUDA only, ignored on the CPU and with --quantize llm.int8",
    )
    decode_kv_step: int = Field(
        32, ge=1, description="decode reads keys up to the next multiple of this (one graph per multiple)"
    )
    # Request limits
    max_new_tokens_limit: int = Field(128, ge=1, description="largest max_new_tokens a request may ask")
    default_max_new_tokens: int = Field(30, ge=1, description="max_new_tokens when a request gives none")
    max_prompt_tokens: int = Field(128, ge=1, description="longest prompt or question, in tokens")
    max_beams: int = Field(8, ge=1, description="largest num_beams a request may ask")
    max_n: int = Field(8, ge=1, description="outputs per request (n)")
    max_candidates: int = Field(64, ge=1, description="candidate answers to score in one request")
    max_items_per_request: int = Field(16, ge=1, description="images (or questions) in one batch request")
    max_body_mb: float = Field(20.0, gt=0, description="largest request body (413 above)")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest image, width x height, checked before decoding (413 above)"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="a request unfinished after this gets 504")
    # Security
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' (or x-api-key)")
    auth_health: bool = Field(False, description="also require the key on /health and /ready")
    auth_metrics: bool = Field(False, description="also require the key on /metrics")
    auth_docs: bool = Field(
        True,
        description="with --api-key, also require it on /docs, /redoc and /openapi.json (a browser cannot "
        "send it: --no-auth-docs keeps them open)",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins; none = CORS off")
    allow_image_urls: bool = Field(False, description="fetch http(s) image URLs (SSRF-checked)")
    image_url_allowlist: list[str] = Field(
        default_factory=list, description="hosts (or *.suffix) URLs may name"
    )
    image_url_timeout_s: float = Field(5.0, gt=0, description="time limit for fetching an image URL")
    # Prompting
    vqa_template: str | None = Field(
        None,
        description="how /vqa wraps a question; default: the model's (BLIP-2 OPT 'Question: {question} "
        "Answer:', Flan-T5 'Question: {question} Short answer:', BLIP the question alone)",
    )
    default_num_beams: int = Field(1, ge=1, description="num_beams when a request gives none")
    vqa_max_new_tokens: int | None = Field(
        None, ge=1, description="/vqa's default max_new_tokens (short answers); unset: default_max_new_tokens"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: Any) -> Any:
        """BLIPSERVE_LOG_LEVEL=DEBUG works as debug (the logging module's names are upper case)."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("root_path")
    @classmethod
    def _root_path_is_a_path(cls, value: str) -> str:
        """'' or '/prefix' (a trailing slash dropped): a prefix without its '/' would match no request."""
        if value and not value.startswith("/"):
            raise ValueError("expected a path that starts with '/' (e.g. /blip), or nothing")
        return value.rstrip("/")

    @field_validator("access_log_exclude")
    @classmethod
    def _paths_start_with_a_slash(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"{path!r}: expected request paths that start with '/' (e.g. /health)")
        return value

    @field_validator("vqa_template")
    @classmethod
    def _template_has_the_question(cls, value: str | None) -> str | None:
        """A template is text with `{question}` in it and no other field (a stray brace or another field
        would fail every /vqa request; one without the question would answer without it)."""
        if value is None:
            return value
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        except ValueError as exc:
            raise ValueError(f"not a template ({exc}); write a literal brace as {{{{ or }}}}") from None
        if fields != {"question"}:
            others = ", ".join(sorted(f"{{{f}}}" for f in fields - {"question"}))
            raise ValueError(
                "expected {question} where the question goes"
                + (f", and no other field ({others})" if others else "")
            )
        return value

    @model_validator(mode="after")
    def _ready_engines_exist(self) -> Settings:
        """--min-ready-engines above --dp could never be met: /ready would stay 503 for ever."""
        if self.min_ready_engines > self.data_parallel_size:
            raise ValueError(
                f"--min-ready-engines {self.min_ready_engines}: more than --dp ({self.data_parallel_size})"
            )
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        """A default a request could not ask for itself would make every request that leaves it out a 422
        naming a field it never sent: refused when given, lowered to the limit when left at its own
        default (--max-new-tokens-limit 20 alone serves 20 tokens by default)."""
        pairs = [
            ("default_max_new_tokens", self.default_max_new_tokens, "max_new_tokens_limit"),
            ("vqa_max_new_tokens", self.vqa_max_new_tokens, "max_new_tokens_limit"),
            ("default_num_beams", self.default_num_beams, "max_beams"),
        ]
        for name, value, limit in pairs:
            if value is None or value <= getattr(self, limit):
                continue
            if value == type(self).model_fields[name].default:  # not chosen: within a lower limit
                setattr(self, name, getattr(self, limit))
                continue
            flag, limit_flag = (f"--{n.replace('_', '-')}" for n in (name, limit))
            raise ValueError(f"{flag} {value}: more than {limit_flag} ({getattr(self, limit)})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @property
    def model_name(self) -> str:
        """The id the model is served under: the first --served-model-name, else --model."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def max_len(self) -> int:
        """Cache positions per sequence: the image queries, the prompt, and the answer."""
        return 64 + self.max_prompt_tokens + self.max_new_tokens_limit


def preset_path(name_or_path: str) -> Path:
    """A preset name from configs/ (e.g. 'blip2-opt-2.7b') or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file {name_or_path!r}; presets: {known}")


class ConfigError(ValueError):
    """A --config file that is not YAML, or not a mapping of settings."""


def check_config_file(path: Path) -> None:
    """ConfigError (one line: the file, the line, the problem) unless `path` holds a YAML mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}: {exc.problem or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of settings (e.g. 'max_queue: 512'), "
            f"got a {type(data).__name__}"
        )


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Flags (`overrides`, None = not given) > BLIPSERVE_* environment > preset file > defaults.
    Raises FileNotFoundError for an unknown preset, ConfigError for a file that is not a YAML mapping,
    pydantic's ValidationError for invalid values."""
    flags = {k: v for k, v in overrides.items() if v is not None}
    if not config:
        return Settings(**flags)
    path = preset_path(config)
    check_config_file(path)

    class FileSettings(Settings):
        model_config = SettingsConfigDict(
            env_prefix="BLIPSERVE_", extra="forbid", allow_inf_nan=False, yaml_file=path
        )

    return Settings(**FileSettings(**flags).model_dump())


# How the server's main process hands its settings and engine process to `api_workers` > 1 HTTP worker
# processes (uvicorn starts them from an import string, so they cannot be passed as arguments).
WORKER_ENV = "BLIPSERVE_WORKER_SPEC_JSON"


def worker_spec(settings: Settings, handle: Any) -> str:
    """The JSON for `WORKER_ENV`: the settings and the engine's handle (or, with --dp, a list of them)."""
    values = settings.model_dump(mode="json")
    if settings.api_key is not None:
        values["api_key"] = settings.api_key.get_secret_value()
    engine = (
        [dataclasses.asdict(h) for h in handle] if isinstance(handle, list) else dataclasses.asdict(handle)
    )
    return json.dumps({"settings": values, "engine": engine})


def read_worker_spec() -> tuple[Settings, dict | list[dict]]:
    """What `worker_spec` wrote: the settings and the engine handle's fields (a list of them with --dp)."""
    spec = json.loads(os.environ[WORKER_ENV])
    return Settings(**spec["settings"]), spec["engine"]
