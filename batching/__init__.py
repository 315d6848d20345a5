"""Queues and scheduling: the bounded request queue, continuous decode batching, the engine thread."""

from .engine_loop import EngineLoop, EngineStopped, SequenceFailed, Ticket
from .scheduler import QueueFull, Scheduler, Sequence

__all__ = ["EngineLoop", "EngineStopped", "QueueFull", "Scheduler", "Sequence", "SequenceFailed", "Ticket"]
