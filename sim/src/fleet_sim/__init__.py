"""Fleet simulator: many synthetic agents in one process, speaking the wire contract."""

__version__ = "0.1.0"

from .fleet import Fleet, SimError, SimSettings, SimStats
from .synthetic import TYPES, Host

__all__ = ["TYPES", "Fleet", "Host", "SimError", "SimSettings", "SimStats", "__version__"]
