"""What crosses the boundary between the HTTP processes and the engine process.

Messages are msgpack (msgspec structs, one tagged union per direction). A request's pixels travel as a
frame of their own after the message, read by the engine in place (`torch.frombuffer` on the received
frame): no pickling and no copy of the image on the way in. Two sockets per HTTP process:

- requests (DEALER -> the engine's ROUTER): `Add`, `Abort`, `Hello`, `MetricsQuery`, `HttpObservations`,
  `Shutdown`; the engine answers `Accepted` / `Rejected` / `Info` / `MetricsText` on it (its I/O thread on
  CUDA, its loop's thread between steps on CPU: `batching.engine_io`).
- results (the engine's ROUTER -> DEALER): `StepOutputs`, one per HTTP process per engine step, carrying
  the `Progress` (new tokens) and `Done` of that process's requests.

Results carry token ids only, and of each output only what was not reported before
(`model.data.detokenizer.unreported`): the HTTP process gathers them and makes the text, stop strings
included (`RequestText`); it sends `Abort` for a request whose outputs all ended at a stop string.
"""

from __future__ import annotations

import math

import msgspec
import torch

from model.data.detokenizer import NewTokens
from model.decoding.generation import SamplingParams
from model.runtime.plan import RetrievalOutput, RetrievalRequest, ScoringOutput, ScoringRequest


class Add(msgspec.Struct, tag=True):
    """Queue a request. `req_id` is the sending HTTP process's own id for it."""

    req_id: int
    # Seconds before the engine drops it (504); None: no deadline.
    timeout_s: float | None
    # Report the outputs after every step (Server-Sent Events).
    stream: bool
    # Shape of the pixel frame that follows: [3, H, W] float32 (normalised), or [H, W, 3] uint8 (before
    # normalising: a CUDA engine normalises on the device); None: no image (text-only embed).
    pixel_shape: tuple[int, ...] | None
    image_key: str
    # Generation: prompt ids after the image placeholders, the decoder's starting history, settings,
    # and the cache positions the request needs (see `model.engine.GenerationRequest`).
    text_ids: list[int] = []
    prompt_ids: list[int] = []
    params: SamplingParams | None = None
    positions: int = 0
    # "float32" or "uint8": the pixel frame's element type.
    pixel_dtype: str = "float32"
    # Retrieval ("match" or "embed", with each text's ids); "" for generation.
    task: str = ""
    texts: list[list[int]] = []
    # Scoring (not empty): each candidate's token ids, scored after `text_ids` (no generation), and the
    # prompt's positions in the decoder and in the text model's input (`ScoringRequest`).
    candidates: list[list[int]] = []
    prefix_positions: int = 0
    source_positions: int = 0
    # Admission order among waiting requests: higher first, FIFO within one (lower runs later).
    priority: int = 0
    # Send the request's stage timestamps back with its `Done` (the HTTP process traces it).
    trace: bool = False


class Abort(msgspec.Struct, tag=True):
    req_ids: list[int]


class Hello(msgspec.Struct, tag=True):
    """Sent on both sockets when an HTTP process connects; answered with `Info` once the engine is up."""


class MetricsQuery(msgspec.Struct, tag=True):
    pass


class HttpObservations(msgspec.Struct, tag=True):
    """HTTP requests' outcomes, counted in the engine's registry so /metrics sums every process. An HTTP
    process gathers them and sends one message within `HTTP_FLUSH_S`, and before its own metrics query
    (`batching.process_client`)."""

    seen: list[tuple[str, int, float]]  # (route template, status code, seconds) per request


class Shutdown(msgspec.Struct, tag=True):
    """Stop taking requests, finish the accepted ones, exit."""


class Load(msgspec.Struct, array_like=True):
    """An engine's load as it answers (piggybacked on acks and results, for the data-parallel router):
    requests waiting, sequences running, free KV-cache slots, and its queue's bound."""

    waiting: int
    running: int
    free_slots: int
    max_queue: int


class Accepted(msgspec.Struct, tag=True):
    req_id: int
    load: Load | None = None


class Rejected(msgspec.Struct, tag=True):
    req_id: int
    # "queue_full" (429), "stopped" (503), "invalid" (422) or "error" (500: the engine failed to take it).
    reason: str
    message: str
    load: Load | None = None


class Info(msgspec.Struct, tag=True):
    model_id: str
    device: str
    dtype: str
    pid: int
    # Bytes of the model's weights as loaded (int8 ones at a byte each, with their scales).
    weight_bytes: int = 0


class MetricsText(msgspec.Struct, tag=True):
    text: bytes


class Progress(msgspec.Struct, tag=True):
    """What a running request gained in one step: per output index, the tokens (and log-probabilities)
    since the last report and, once it ended, its finish reason; empty entries for outputs with nothing
    new. Sent when the `Add` asked for `stream`."""

    req_id: int
    outputs: list[NewTokens]
    # Seconds from arrival at the engine to admission (as `Done.queue_s`): the HTTP process completes a
    # request that ended at a stop string itself, without waiting for the engine's `Done`.
    queue_s: float = 0.0


class Done(msgspec.Struct, tag=True):
    """A request ended: `finish_reason` stop / length (with its outputs), or cancelled / timeout / error."""

    req_id: int
    finish_reason: str
    # Seconds from arrival at the engine to admission into a step.
    queue_s: float
    # Per output index, what `Progress` did not report yet (everything, for a request not streamed). The
    # clients (`batching.client.EngineClient`) hand on the whole outputs they gathered (`TokenOutput`s).
    outputs: list[NewTokens] = []
    retrieval: RetrievalOutput | None = None
    scores: ScoringOutput | None = None
    # Only when the `Add` asked for `trace`: when each stage began and ended, in seconds since the Unix
    # epoch (the engine's clock): "arrived", "admitted", "vision_start"/"vision_end", "prefill_start"/
    # "prefill_end" (generation) or "retrieval_start", and "finished" (see `Sequence.timestamps`).
    timestamps: dict[str, float] = {}
    load: Load | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length")


class StepOutputs(msgspec.Struct, tag=True):
    """What one engine step reports to one HTTP process, in one message (vLLM's `EngineCoreOutputs`):
    the progress of its requests that gained tokens, or the ends of those that finished. One message per
    process per step, not one per request: the cost of a message (ZMQ frames, the I/O thread, the HTTP
    process's event loop) is paid once, however many requests it carries."""

    progress: list[Progress] = []
    done: list[Done] = []


ToEngine = Add | Abort | Hello | MetricsQuery | HttpObservations | Shutdown
FromEngine = Accepted | Rejected | Info | MetricsText | Progress | Done | StepOutputs

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def encode(message: ToEngine | FromEngine) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(data: bytes | memoryview) -> ToEngine:
    return _to_engine.decode(data)


def decode_from_engine(data: bytes | memoryview) -> FromEngine:
    return _from_engine.decode(data)


def reports_each_step(request: object, stream: bool) -> bool:
    """Whether the engine reports the request's tokens after every step: when the client streams, and
    for stop strings (the front end looks for them as the tokens come; beams are cut afterwards)."""
    params = getattr(request, "params", None)
    return stream or (params is not None and bool(params.stop) and params.num_beams == 1)


def add_message(
    req_id: int, request: object, timeout_s: float | None, stream: bool, trace: bool = False
) -> list:
    """`Add` and its pixel frame for a GenerationRequest, RetrievalRequest or ScoringRequest, as the
    HTTP process built it (the engine unpacks it, `batching.engine_process.request_from_message`);
    `trace`: the engine reports the request's stage timestamps with its `Done`."""
    pixels: torch.Tensor | None = request.pixel_values
    shape = tuple(pixels.shape) if pixels is not None else None
    if pixels is not None and pixels.dtype != torch.uint8:
        pixels = pixels.to(torch.float32)
    dtype = "uint8" if pixels is not None and pixels.dtype == torch.uint8 else "float32"
    if isinstance(request, RetrievalRequest):
        fields = {"task": request.task, "texts": request.texts}
    elif isinstance(request, ScoringRequest):
        fields = {
            f: getattr(request, f) for f in ("text_ids", "candidates", "prefix_positions", "source_positions")
        }
    else:
        fields = {f: getattr(request, f) for f in ("text_ids", "prompt_ids", "params", "positions")}
    fields["priority"] = getattr(request, "priority", 0)
    msg = Add(req_id, timeout_s, stream, shape, request.image_key, pixel_dtype=dtype, trace=trace, **fields)
    frames: list = [encode(msg)]
    if pixels is not None:
        frames.append(memoryview(pixels.contiguous().numpy()).cast("B"))
    return frames


PIXEL_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}

# The received frame is read-only, and torch warns that a tensor viewing it could write it: the engine
# only reads pixels (it copies them to the device).
READ_ONLY_WARNING = "The given buffer is not writable"


def pixels_of(msg: Add, frame: object | None) -> torch.Tensor | None:
    """The request's pixels, viewing the received frame's memory (kept alive by the tensor)."""
    if msg.pixel_shape is None or frame is None:
        return None
    if msg.pixel_dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {sorted(PIXEL_DTYPES)}, got {msg.pixel_dtype!r}")
    flat = torch.frombuffer(frame, dtype=PIXEL_DTYPES[msg.pixel_dtype])
    if flat.numel() != math.prod(msg.pixel_shape):
        raise ValueError(f"pixel frame of {flat.numel()} values, expected shape {msg.pixel_shape}")
    return flat.view(msg.pixel_shape)
