"""A stand-in for `batching.engine_process.run_engine` (same arguments), light enough to spawn in a blink: it
binds the engine's address and exits cleanly (status 0) at the first message, the owner's Shutdown."""

from __future__ import annotations

import zmq


def engine(settings: object, root: str, address: str) -> None:
    """Bind `address` as the engine does, and exit cleanly at the first message (a Shutdown)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    sock.recv_multipart()
    sock.close(0)
    ctx.term()
