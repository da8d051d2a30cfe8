"""Interchangeable stores behind one protocol, chosen by `persister.store`."""

from __future__ import annotations

from typing import Callable, Dict

from fleet_common.config import PersisterConfig

from .base import (
    AgentRecord,
    Batch,
    Incoming,
    RejectedRecord,
    RequestRecord,
    Stats,
    Store,
    StoreError,
)


def _sqlite(cfg: PersisterConfig) -> Store:
    from .sqlite import SqliteStore

    return SqliteStore(cfg.sqlite_path, cfg.retention_s)


def _mongodb(cfg: PersisterConfig) -> Store:
    from .mongodb import MongoStore  # pymongo is imported only when it is chosen

    return MongoStore.from_uri(cfg.mongodb_uri, cfg.retention_s, cfg.mongodb_database)


STORES: Dict[str, Callable[[PersisterConfig], Store]] = {"sqlite": _sqlite, "mongodb": _mongodb}


def open_store(cfg: PersisterConfig) -> Store:
    """Open the store `cfg.store` names; raise StoreError saying what to check if it cannot be used."""
    try:
        factory = STORES[cfg.store]
    except KeyError:
        raise StoreError(f"config key 'persister.store': {cfg.store!r} must be one of {', '.join(STORES)}") from None
    return factory(cfg)


__all__ = ["STORES", "AgentRecord", "Batch", "Incoming", "RejectedRecord", "RequestRecord", "Stats", "Store",
           "StoreError", "open_store"]
