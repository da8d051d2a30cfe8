"""Fleet simulator: many synthetic agents in one process, speaking the wire contract."""

from fleet_common.version import dist_version

# Set before the imports below: fleet_sim.agent and fleet_sim.cli read it as they load.
__version__ = dist_version("fleet-sim")

from .fleet import Fleet, SimError, SimSettings, SimStats
from .synthetic import TYPES, Host

__all__ = ["TYPES", "Fleet", "Host", "SimError", "SimSettings", "SimStats", "__version__"]
