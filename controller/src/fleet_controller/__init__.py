"""Fleet telemetry controller: asks every agent for each request type on a spread schedule."""

from fleet_common.version import dist_version

from .controller import Controller
from .schedule import Schedule, Shard, phase_ms, shard_of, stable_hash

__version__ = dist_version("fleet-controller")

__all__ = ["Controller", "Schedule", "Shard", "phase_ms", "shard_of", "stable_hash"]
