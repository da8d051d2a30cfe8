"""fleet-persister: the only writer to storage; acknowledges messages after commit.
The stores it writes to are fleet_store's."""

from fleet_common.version import dist_version

from .persister import Counters, Persister

__version__ = dist_version("fleet-persister")

__all__ = ["Counters", "Persister"]
