"""The engine process: scheduler, runner and model, and nothing else (no HTTP, no image decoding).

`EngineProcess` starts it (multiprocessing "spawn": a fresh interpreter, no forked CUDA or thread
state), tells its address and pid to the HTTP processes, watches it, and stops it: a `Shutdown`
message, then the process drains the requests it accepted and exits. `run_engine` is the process.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from batching import EngineCore, Scheduler
from batching.protocol import Add, Info, Shutdown, encode
from model import placement
from model.checkpoint.loader import resolve_checkpoint
from model.engine import TINY_RANDOM, Blip2Engine, GenerationRequest
from model.request_checks import RequestGuard
from model.runtime.options import DecodeOptions
from model.runtime.plan import RetrievalRequest, ScoringRequest
from model.runtime.quant import weight_bytes
from model.runtime.runner import ModelRunner
from server.logs import exit_now
from server.settings import Settings

from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineHandle:
    """Where an engine process listens and what it serves: all an HTTP process needs to use it."""

    address: str  # zmq endpoint (ipc:// path)
    pid: int
    root: str  # the checkpoint's local directory (tokenizer, processor and config for the HTTP side)
    model_id: str
    index: int = 0  # which engine of --dp
    device: str = ""  # the device it was given (--devices), as the user named it


def build_engine_core(settings: Settings, engine: Blip2Engine, metrics: Metrics) -> EngineCore:
    """Runner, scheduler and loop as the settings ask (the engine process's, or an in-process one's)."""
    max_len = min(settings.max_len, engine.max_positions)
    options = DecodeOptions(
        cuda_graphs=settings.cuda_graphs,
        kv_step=settings.decode_kv_step,
        vision_batch=settings.max_batch_images,
    )
    runner = engine.new_runner(settings.max_running_seqs, max_len, settings.embedding_cache_mb << 20, options)
    on_cuda = engine.device.type == "cuda"
    scheduler = Scheduler(
        settings.max_running_seqs,
        settings.max_queue,
        settings.max_batch_images,
        engine.eos_ids,
        settings.background_vision if settings.background_vision is not None else on_cuda,
    )
    overlap = settings.overlap if settings.overlap is not None else on_cuda
    metrics.prompt_length = engine.processor.prompt_tokens
    metrics.follow(scheduler)
    return EngineCore(runner, scheduler, settings.max_wait_ms, metrics.on_step, overlap)


def engine_guard(engine: Blip2Engine, runner: ModelRunner) -> RequestGuard:
    """The checks that protect this engine from a request it is sent (its image side, cache, slots)."""
    side = engine.image_processor
    return RequestGuard(engine.processor, side.height, side.width, runner.max_len, runner.num_slots)


def load_engine(settings: Settings, root: Path | None = None) -> Blip2Engine:
    """The model of `settings` (from `root`, its local directory, when the caller has resolved it),
    served under `settings.model_name`."""
    device = placement.resolve_device(settings.device)  # checked before a hub id is fetched
    # bitsandbytes' LLM.int8 layers go in after loading: the decode step stays on PyTorch's ops there.
    attention = "sdpa" if settings.quantize == "llm.int8" else "auto"
    if root is None and settings.model == TINY_RANDOM:
        engine = Blip2Engine.from_pretrained(settings.model, device, settings.dtype, attention)
        engine.model_id = settings.model_name
    else:
        root = root or resolve_checkpoint(settings.model, settings.revision)
        engine = Blip2Engine.load_dir(root, settings.model_name, device, settings.dtype, attention)
    if settings.qformer_precision != "auto":
        if not hasattr(engine.model, "set_qformer_precision"):
            raise ValueError(
                f"--qformer-precision applies to BLIP-2 caption/vqa models, not {engine.model_id}"
            )
        engine.model.set_qformer_precision(settings.qformer_precision)
    if settings.quantize == "int8":
        from model.runtime.quant import quantize_w8a16

        quantize_w8a16(engine.model)
    elif settings.quantize == "llm.int8":
        from model.runtime.quant import quantize_int8

        quantize_int8(engine.model)
    return engine


def request_from_message(guard: RequestGuard) -> Callable[[Add, object], object]:
    """The engine's request of an `Add` message: its fields unpacked as the HTTP process built them,
    checked only for what would harm the engine (`model.request_checks`: sizes, slots, token ids);
    ValueError (a 422) otherwise."""

    def build(msg: Add, pixels: object) -> object:
        if msg.task:
            request = RetrievalRequest(msg.task, pixels, msg.image_key, msg.texts)
        elif msg.candidates:
            request = ScoringRequest(
                pixels,
                msg.image_key,
                msg.text_ids,
                msg.candidates,
                msg.prefix_positions,
                msg.source_positions,
                msg.priority,
            )
        elif msg.params is None:
            raise ValueError("params: a generation request needs its sampling settings")
        else:
            request = GenerationRequest(
                pixels,
                msg.image_key,
                msg.text_ids,
                msg.prompt_ids,
                msg.params,
                msg.positions,
                msg.priority,
            )
        return guard.check(request)

    return build


def run_engine(settings: Settings, root: str, address: str) -> None:
    """The engine process: load, capture graphs, serve until a Shutdown has drained it."""
    from batching.engine_io import EngineIO
    from server.logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server drains us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # likewise `docker stop`: the owner sends Shutdown
    _exit_with_parent(Path(address.removeprefix("ipc://")).parent)
    torch.set_num_threads(settings.engine_threads or max(1, (os.cpu_count() or 1) - settings.api_workers))
    try:
        engine = load_engine(settings, Path(root))
    except Exception as exc:
        # One line for the user; the traceback only at --log-level debug.
        debug = settings.log_level.lower() == "debug"
        log.error("cannot load %s: %s: %s", settings.model, type(exc).__name__, exc, exc_info=debug)
        raise SystemExit(3) from None
    metrics = Metrics()
    loop = build_engine_core(settings, engine, metrics)
    log.info(
        "engine on %s: background vision %s, overlapped steps %s",
        engine.device,
        "on" if loop.scheduler.background_vision else "off",
        "on" if loop.overlap else "off",
    )
    loop.runner.prepare()
    gc.freeze()  # what start-up made lives until the end: no collection walks it again, not even at exit
    metrics.ready.set(1)
    dtype = str(engine.dtype).removeprefix("torch.")
    info = Info(settings.model_name, str(engine.device), dtype, os.getpid(), weight_bytes(engine.model))
    build = request_from_message(engine_guard(engine, loop.runner))
    inline = engine.device.type == "cpu"  # the loop's thread receives between steps (`engine_io`)
    shell = EngineIO(loop, build, info, metrics.render, metrics.observe_http, inline=inline)
    shell.serve(address)
    log.info("engine process done after %d steps (%d launched ahead)", loop.steps, loop.launched_ahead)
    shell.ctx.destroy(linger=2000)  # the last replies go out (the router's linger) before the process ends
    exit_now(0)  # drained and closed: skip the interpreter's teardown (seconds of garbage collection)


def _child(target: Callable[[Settings, str, str], None], env: dict[str, str], *args: object) -> None:
    """The spawned process: its own environment first (CUDA_VISIBLE_DEVICES, before CUDA initialises,
    as vLLM's CoreEngineProcManager gives each engine its GPU), then `target`."""
    os.environ.update(env)
    target(*args)


def _exit_with_parent(workdir: Path) -> None:
    """If the server's main process is killed outright (no Shutdown), the engine must not live on; it
    removes the server's working directory (its socket, tiny-random's files) on its way out."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.error("the server process is gone; the engine exits")
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="blipserve-parent-watch", daemon=True).start()


# The server's working directory: <tmp>/blipserve-<pid of the server's main process>-<random>.
WORKDIR_PREFIX = "blipserve-"


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """Remove the working directories (engine socket, tiny-random's files) that servers killed outright
    left behind in `tmp` (default: the system's temporary directory): those of processes that are gone.
    Returns what it removed."""
    tmp = Path(tmp or tempfile.gettempdir())
    removed = []
    for path in tmp.glob(WORKDIR_PREFIX + "*-*"):
        pid = path.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def new_workdir() -> str:
    """A fresh working directory for this server (engine sockets, tiny-random's files), after removing
    those that servers killed outright left behind."""
    for stale in remove_stale_workdirs():
        log.info("removed %s, left by a server that is gone", stale)
    return tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")


def checkpoint_root(settings: Settings, workdir: str, root: Path | None = None) -> Path:
    """The checkpoint's local directory: tiny-random's written into `workdir`, else `root` when the
    caller has resolved it, else the hub id fetched (once, here)."""
    if settings.model == TINY_RANDOM:
        from model.checkpoint.tiny import write_tiny_checkpoint

        return write_tiny_checkpoint(Path(workdir) / "tiny")
    return root or resolve_checkpoint(settings.model, settings.revision)


class EngineProcess:
    """Start, watch and stop an engine process (the server's main process owns it). One thread reaps
    it (`_reap`); everything else waits on that thread's event, never on the process itself (two
    threads joining one process race: the loser sees it 'still running' after it has exited)."""

    def __init__(
        self,
        settings: Settings,
        root: Path | None = None,
        target: Callable[[Settings, str, str], None] | None = None,
        index: int = 0,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        device: str = "",
    ):
        """`root`: the checkpoint's local directory, when the caller has resolved it already. `target`:
        what the process runs, `run_engine` (tests stand an engine in with the same arguments). With
        --dp (`batching.engine_group`): `index` of the engine, the group's `workdir` (its socket goes
        there, `engine-INDEX.sock`), the child's extra environment `env`, and its `device` as named."""
        self.settings = settings
        self.target = target or run_engine
        self.index, self.device = index, device
        self.env = dict(env or {})
        self._own_dir = workdir is None
        if workdir is None:
            self._dir = new_workdir()
            self.address = f"ipc://{self._dir}/engine.sock"
        else:
            self._dir = workdir
            self.address = f"ipc://{workdir}/engine-{index}.sock"
        self.model_id = settings.model_name
        if root is not None and workdir is not None:
            self.root = root
        else:
            self.root = checkpoint_root(settings, self._dir, root)
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.exited = threading.Event()  # set by the reaper once the process is gone
        self.exitcode: int | None = None
        self._on_exit: list[Callable[[int | None], None]] = []
        self._lock = threading.Lock()

    def start(self) -> EngineHandle:
        """Start the process (again, after it has exited: same address, same device)."""
        ctx = multiprocessing.get_context("spawn")
        args = (self.target, self.env, self.settings, str(self.root), self.address)
        with self._lock:
            self.exited = threading.Event()
            self.exitcode = None
            self.proc = ctx.Process(target=_child, args=args, name=f"blipserve-engine-{self.index}")
            self.proc.start()
        log.info("engine process %d started (pid %d)", self.index, self.proc.pid)
        proc, exited = self.proc, self.exited
        threading.Thread(
            target=self._reap, args=(proc, exited), name="blipserve-engine-reap", daemon=True
        ).start()
        return self.handle

    @property
    def handle(self) -> EngineHandle:
        return EngineHandle(
            self.address, self.proc.pid, str(self.root), self.model_id, self.index, self.device
        )

    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    def _reap(self, proc: multiprocessing.process.BaseProcess, exited: threading.Event) -> None:
        proc.join()
        with self._lock:
            self.exitcode = proc.exitcode
            exited.set()
            callbacks = list(self._on_exit)
        for on_exit in callbacks:
            on_exit(self.exitcode)

    def watch(self, on_exit: Callable[[int | None], None]) -> None:
        """Call `on_exit(exitcode)` from the reaper thread whenever the process ends (at once if it has;
        again after each restart)."""
        with self._lock:
            self._on_exit.append(on_exit)
            if not self.exited.is_set():
                return
        on_exit(self.exitcode)

    def stop(self, timeout_s: float) -> None:
        """Ask the engine to finish what it accepted and exit; kill it if it has not within the time.
        The working directory (socket, tiny-random's files) goes either way."""
        try:
            if self.alive():
                ctx = zmq.Context.instance()
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(self.address)
                sock.send(encode(Shutdown()))
                stopped = self.exited.wait(timeout_s)
                sock.close()
                if not stopped:
                    log.warning("engine process did not stop within %.0fs; killing it", timeout_s)
                    self.proc.kill()
                    self.exited.wait(5)
        finally:
            if self._own_dir:
                shutil.rmtree(self._dir, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie that its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
