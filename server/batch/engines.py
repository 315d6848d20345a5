"""The engines of a local `blipserve batch` job: the model on a thread of this process, or with `--dp N`
N engine processes started as the server starts them (`batching.engine_group.EngineGroup`: one per
device, restarted when one dies), the job's `Service` routing each row to the least loaded one.

The group is this process's children: `stop_service` drains and stops them when the job ends, whatever
the outcome (finished, failed, or stopped by SIGTERM / Ctrl-C); if this process is killed outright,
each engine sees its parent gone and exits by itself (`batching.engine_process._exit_with_parent`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from batching.engine_group import EngineGroup, plan_devices

from ..service import Service
from ..settings import Settings
from ..startup import StartupError

log = logging.getLogger("blipserve")

# Per engine, the requests its scheduler admitted (the warm-up request included): one sample each
# in the merged --dp exposition, labelled `engine`.
ADMITTED = "blipserve_queue_wait_seconds_count"


class BatchEngines(EngineGroup):
    """An `EngineGroup` whose restart loop (an engine dying `engine_restart_limit` times within the
    window) fails the job instead of ending a server: `failed` is set (from the group's reaper thread)."""

    def __init__(self, settings: Settings, root: Path | None = None):
        self.failed = threading.Event()
        super().__init__(settings, root, on_fatal=lambda index, code: self.failed.set())


def build_service(settings: Settings, root: Path | None = None) -> Service:
    """The job's `Service`: `engine: thread` for `data_parallel_size` 1; otherwise `BatchEngines`
    started (N engine processes, still loading their models when this returns) and connected;
    `start_service` waits for all N.
    `root`: the checkpoint's local directory when the caller has resolved it. Raises StartupError when
    --devices does not name one device per engine or there are fewer GPUs than engines; the engines
    started are stopped again if building the service raises."""
    if settings.data_parallel_size == 1:
        return Service.build(settings.model_copy(update={"engine": "thread"}))
    # The job starts once every engine has loaded (with fewer, the first would take all the rows in
    # flight); an engine that dies later is restarted while the others go on.
    n = settings.data_parallel_size
    settings = settings.model_copy(update={"engine": "process", "min_ready_engines": n})
    try:
        plan_devices(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    group = BatchEngines(settings, root)
    try:
        handles = group.start()
        svc = Service.build(settings, handles)
    except BaseException:
        group.stop(settings.graceful_timeout_s)
        raise
    svc.lifecycle.owner = group  # Service.shutdown drains and stops it
    return svc


async def start_service(svc: Service, poll_s: float = 0.2) -> None:
    """`svc.start()`: for --dp, until every engine has loaded its model. Raises StartupError if the
    engines fail first (one dies over and over, e.g. its model does not load on its device)."""
    group = svc.lifecycle.owner
    if not isinstance(group, BatchEngines):
        await svc.start()
        return
    start = asyncio.ensure_future(svc.start())
    while not start.done():
        if group.failed.is_set():
            start.cancel()
            raise StartupError("the engine processes could not start (see the errors above)")
        await asyncio.wait({start}, timeout=poll_s)
    start.result()


async def admitted(svc: Service) -> dict[int, int]:
    """--dp: each engine's admitted requests so far (engine index -> count; warm-up included), from
    the engines' metrics; {} for the in-process engine."""
    if not isinstance(svc.lifecycle.owner, BatchEngines):
        return {}
    text = (await svc.lifecycle.render_metrics()).decode()
    counts: dict[int, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ADMITTED and "engine" in sample.labels:
                counts[int(sample.labels["engine"])] = int(sample.value)
    return counts


async def stop_service(svc: Service) -> None:
    """Finish what the engines accepted and stop them (and with --dp, log how many requests each engine
    admitted, at info level: `--log-level info`)."""
    try:
        for index, count in sorted((await admitted(svc)).items()):
            log.info("engine %d (%s) admitted %d requests", index, svc.client.devices[index] or "", count)
    except Exception as exc:  # only a log line: never a reason to leave the engines running
        log.warning("could not read the engines' metrics: %s", exc)
    finally:
        await svc.shutdown()
