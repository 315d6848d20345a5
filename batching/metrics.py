"""Prometheus metrics, in a registry owned by the app (no module-level globals).

With the engine in a process of its own, the registry lives there: the HTTP processes send each
request's route, status and latency to it (`observe_http`), and /metrics on any of them shows the sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from batching import Scheduler
from model.runtime.plan import StepOutput, StepPlan

# The series the HTTP processes count (one registry holds them: summed over engines with --dp).
HTTP_FAMILIES = ("blipserve_requests", "blipserve_request_latency_seconds")
ENGINE_COUNTS = ("blipserve_engines_ready", "blipserve_engines")
ENGINES_READY_HELP = "Engine processes up and serving (--dp)"
ENGINES_HELP = "Engine processes configured (--dp)"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Fine enough to read a p99 against the decode step's own time.
GAP_BUCKETS = (0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, prompt_length: Callable[[Sequence[int]], int] = len) -> None:
        """`prompt_length(text_ids)`: the positions a prompt takes in the language model (the model's
        `prompt_tokens`: image queries included, as in a response's usage.prompt_tokens)."""
        self.prompt_length = prompt_length
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "blipserve_requests",
            "HTTP requests, by route template ('unmatched' for paths no route serves) and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "blipserve_request_latency_seconds",
            "End-to-end latency, by route template",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "blipserve_time_to_first_token_seconds",
            "From the engine accepting a generation request to its first token (queue, vision, prefill)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "blipserve_queue_wait_seconds",
            "Time from arrival to admission",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.vision = Histogram(
            "blipserve_vision_seconds", "Vision + Q-Former batch", buckets=STAGE_BUCKETS, registry=r
        )
        self.prefill = Histogram(
            "blipserve_prefill_seconds", "Prefill batch", buckets=STAGE_BUCKETS, registry=r
        )
        self.token_gap = Histogram(
            "blipserve_inter_token_seconds",
            "Time between two tokens of a running sequence (what a decode waits for newcomers)",
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "blipserve_decode_step_seconds",
            "One decode step (per-token latency)",
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.vision_batch = Histogram(
            "blipserve_vision_batch_size", "Images per vision batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_batch = Histogram(
            "blipserve_decode_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.tokens = Counter("blipserve_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter(
            "blipserve_prompt_tokens",
            "Prompt positions prefilled (image queries and text, as usage.prompt_tokens)",
            registry=r,
        )
        self.queue_depth = Gauge("blipserve_queue_depth", "Requests waiting", registry=r)
        self.active = Gauge("blipserve_active_sequences", "Sequences in the decode batch", registry=r)
        self.free_slots = Gauge("blipserve_free_kv_slots", "Free KV-cache slots", registry=r)
        self.cache_hits = Counter("blipserve_image_cache_hits", "Image embedding cache hits", registry=r)
        self.cache_misses = Counter(
            "blipserve_image_cache_misses", "Image embedding cache misses", registry=r
        )
        self.gpu_memory = Gauge("blipserve_gpu_memory_bytes", "CUDA memory allocated", registry=r)
        self.ready = Gauge("blipserve_ready", "1 when the model is loaded and warmed", registry=r)
        # One engine here; with --dp the HTTP side counts (`merge_engine_metrics`).
        self.engines_ready = Gauge("blipserve_engines_ready", ENGINES_READY_HELP, registry=r)
        self.engines = Gauge("blipserve_engines", ENGINES_HELP, registry=r)
        self.engines.set(1)

    def follow(self, scheduler: Scheduler) -> None:
        """The state gauges (queue depth, active sequences, free KV slots) read `scheduler` whenever
        they are collected: every change shows (a step, a cancelled or expired sequence dropped, a
        failed step, a failed vision batch), not only the last step's. Read without the engine's lock,
        as the engine's `Load` reports are: each value is one list's length."""
        self.queue_depth.set_function(lambda: len(scheduler.waiting))
        self.active.set_function(lambda: len(scheduler.running))
        self.free_slots.set_function(lambda: len(scheduler.free_slots))

    def on_step(self, plan: StepPlan, out: StepOutput, scheduler: Scheduler) -> None:
        """Called by the engine thread after every step: the step's counters and histograms (the state
        gauges follow the scheduler itself, `follow`)."""
        if out.vision_images:
            self.vision.observe(out.vision_s)
            self.vision_batch.observe(out.vision_images)
        self.cache_hits.inc(out.cache_hits)
        self.cache_misses.inc(out.vision_images)
        if plan.prefills:
            self.prefill.observe(out.prefill_s)
            self.prompt_tokens.inc(sum(self.prompt_length(w.text_ids) for w in plan.prefills))
        if plan.decodes:
            self.decode.observe(out.decode_s)
            self.decode_batch.observe(out.decode_rows)
        self.tokens.inc(scheduler.stepped)  # sequences that gained a token this step
        for gap in scheduler.token_gaps:
            self.token_gap.observe(gap)
        for wait in scheduler.first_token_waits:
            self.first_token.observe(wait)
        for wait in scheduler.take_queue_waits():
            self.queue_wait.observe(wait)

    def observe_http(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request's outcome (from any HTTP process)."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_gpu(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated())

    def render(self) -> bytes:
        self.observe_gpu()
        self.engines_ready.set(self.registry.get_sample_value("blipserve_ready") or 0)
        return generate_latest(self.registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_engine_metrics(texts: dict[int, bytes], engines_ready: int, engines: int) -> bytes:
    """One exposition from --dp engines' registries (`texts`: engine index -> its text): each engine
    series gains an `engine` label, the HTTP series (`HTTP_FAMILIES`) are summed over engines (each
    HTTP request is counted by one engine), `_created` series are dropped, and
    `blipserve_engines_ready` / `blipserve_engines` count the engines up and configured."""
    families: dict[str, Metric] = {}
    sums: dict[tuple[str, tuple], float] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            if family.name.endswith("_created") or family.name in ENGINE_COUNTS:
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                if family.name in HTTP_FAMILIES:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
                else:
                    merged.add_sample(sample.name, {"engine": str(index), **sample.labels}, sample.value)
    for (name, labels), value in sums.items():
        family = next(f for f in HTTP_FAMILIES if name.startswith(f))
        families[family].add_sample(name, dict(labels), value)
    ready = GaugeMetricFamily("blipserve_engines_ready", ENGINES_READY_HELP)
    ready.add_metric([], engines_ready)
    total = GaugeMetricFamily("blipserve_engines", ENGINES_HELP)
    total.add_metric([], engines)
    registry = CollectorRegistry()
    registry.register(_Families([*families.values(), ready, total]))
    return generate_latest(registry)
