"""Test-only entry point: the server's CLI with engines that sleep after every step, so that a test can
make one engine of --dp slower than another, or keep requests running long enough to signal the server.

    SLOW_ENGINES="INDEX:SECONDS[,INDEX:SECONDS]" python -m slow_engines <blipserve serve flags>

(`tests/` on PYTHONPATH: `live.serve_in_process(..., entry="slow_engines")`). The engine processes are
started with multiprocessing's "spawn": each child imports this script as `__mp_main__` before it runs
`run_engine`, so the patch below, made at import time, applies in every engine process too. An engine
finds its index in its process name (`blipserve-engine-INDEX`, given by `EngineProcess`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time

from batching import EngineCore, engine_process

ENV = "SLOW_ENGINES"
log = logging.getLogger("slow_engines")


def step_delay(process_name: str, spec: str) -> float:
    """The seconds engine `process_name` sleeps after each step under `spec` (0: not slowed)."""
    index = process_name.rpartition("-")[2]
    delays = dict(part.split(":", 1) for part in spec.split(",") if ":" in part)
    return float(delays.get(index, 0))


def slowed(make_loop):
    """`engine_process.build_engine_core`, its loop sleeping after every step as `SLOW_ENGINES` says."""

    def build_engine_core(*args: object) -> EngineCore:
        loop = make_loop(*args)
        name = multiprocessing.current_process().name
        delay, hook = step_delay(name, os.environ.get(ENV, "")), loop.on_step
        if delay > 0:
            log.warning("test-only: %s sleeps %.3fs after every step", name, delay)

            def slow(*step: object) -> None:
                if hook is not None:
                    hook(*step)
                time.sleep(delay)

            loop.on_step = slow
        return loop

    return build_engine_core


# Run as the entry point (`__main__`), or imported as such by a spawned child (`__mp_main__`); a test that
# imports this module for `ENV` patches nothing.
if __name__ in ("__main__", "__mp_main__"):
    engine_process.build_engine_core = slowed(engine_process.build_engine_core)

if __name__ == "__main__":
    from server.cli import main

    sys.exit(main())
