"""Fleet simulator: many synthetic agents in one process, speaking the wire contract."""

from fleet_common.version import dist_version

from .fleet import Fleet, SimError, SimSettings, SimStats
from .synthetic import TYPES, Host

__version__ = dist_version("fleet-sim")

__all__ = ["TYPES", "Fleet", "Host", "SimError", "SimSettings", "SimStats", "__version__"]
