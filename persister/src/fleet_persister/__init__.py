"""fleet-persister: the only writer to storage; acknowledges messages after commit."""

from .persister import Counters, Persister
from .stores import AgentRecord, Batch, Incoming, RejectedRecord, RequestRecord, Stats, Store, StoreError, open_store

__version__ = "0.1.0"

__all__ = ["AgentRecord", "Batch", "Counters", "Incoming", "Persister", "RejectedRecord", "RequestRecord", "Stats",
           "Store", "StoreError", "open_store"]
