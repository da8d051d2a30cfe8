"""Fleet telemetry controller: asks every agent for each request type on a spread schedule."""

from .controller import Controller
from .schedule import Schedule, Shard, phase_ms, shard_of, stable_hash

__version__ = "0.1.0"

__all__ = ["Controller", "Schedule", "Shard", "phase_ms", "shard_of", "stable_hash"]
