"""Queues and scheduling: the bounded request queue, continuous decode batching, the engine loop, and the
clients that drive it (in this process, or an engine process over ZMQ)."""

from .client import EngineClient, InprocClient, SequenceFailed, Ticket
from .engine_core import EngineCore, EngineStopped
from .scheduler import QueueFull, Scheduler, Sequence

__all__ = [
    "EngineClient",
    "EngineCore",
    "EngineStopped",
    "InprocClient",
    "QueueFull",
    "Scheduler",
    "Sequence",
    "SequenceFailed",
    "Ticket",
]
