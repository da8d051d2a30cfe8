"""fleet-persister: the only writer to storage; acknowledges messages after commit."""

from fleet_common.version import dist_version

from .persister import Counters, Persister
from .stores import AgentRecord, Batch, Incoming, RejectedRecord, RequestRecord, Stats, Store, StoreError, open_store

__version__ = dist_version("fleet-persister")

__all__ = ["AgentRecord", "Batch", "Counters", "Incoming", "Persister", "RejectedRecord", "RequestRecord", "Stats",
           "Store", "StoreError", "open_store"]
