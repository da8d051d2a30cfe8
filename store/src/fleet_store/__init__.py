"""Interchangeable stores, chosen by `persister.store`: the persister writes through `StoreWriter`,
fleetctl and the dashboard read through `StoreReader`; each store is both (`Store`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from fleet_common.backoff import Backoff
from fleet_common.config import PersisterConfig
from fleet_common.version import dist_version

from .base import (
    MAX_REJECTED_PAYLOAD,
    AgentRecord,
    Batch,
    EncodedJSON,
    Incoming,
    LatestRecord,
    RejectedRecord,
    RequestRecord,
    Stats,
    Store,
    StoreError,
    StoreMissing,
    StoreReader,
    StoreUnreachable,
    StoreWriter,
    dead_letter,
    refused,
)
from .trends import SERIES, TrendRecord

__version__ = dist_version("fleet-store")

log = logging.getLogger("fleet.persister")


def _sqlite(cfg: PersisterConfig) -> Store:
    from .sqlite import SqliteStore

    return SqliteStore(cfg.sqlite_path, cfg.retention_s, trend_retention_s=cfg.trend_retention_s)


def _mongodb(cfg: PersisterConfig) -> Store:
    from .mongodb import MongoStore  # pymongo is imported only when it is chosen

    return MongoStore.from_uri(cfg.mongodb_uri, cfg.retention_s, cfg.mongodb_database,
                               trend_retention_s=cfg.trend_retention_s)


STORES: dict[str, Callable[[PersisterConfig], Store]] = {"sqlite": _sqlite, "mongodb": _mongodb}
# Stores that keep JSON as text, and so take a response's data already encoded (EncodedJSON).
ENCODES_JSON = frozenset({"sqlite"})


def open_store(cfg: PersisterConfig) -> Store:
    """Open the store `cfg.store` names; raise StoreError saying what to check if it cannot be used."""
    try:
        factory = STORES[cfg.store]
    except KeyError:
        raise StoreError(f"config key 'persister.store': {cfg.store!r} must be one of {', '.join(STORES)}") from None
    return factory(cfg)


def open_reader(cfg: PersisterConfig) -> StoreReader:
    """The store opened for reading only (fleetctl status, history): a SQLite file is never
    created; StoreMissing, naming the path, if there is none."""
    if cfg.store == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(cfg.sqlite_path, cfg.retention_s, read_only=True, trend_retention_s=cfg.trend_retention_s)
    return open_store(cfg)


def describe(cfg: PersisterConfig) -> str:
    """Which store the config names, for a reader to say what it read: 'sqlite /abs/fleet.db'."""
    if cfg.store == "sqlite":
        return f"sqlite {Path(cfg.sqlite_path).expanduser().resolve()}"
    return f"mongodb database {cfg.mongodb_database!r}"


def open_store_waiting(cfg: PersisterConfig, stop: threading.Event,
                       backoff: Backoff | None = None) -> Store | None:
    """open_store, retrying with backoff (1 s doubling to 30 s) while the store's server is
    unreachable, as the link does for the broker; None if `stop` is set first. A store that
    can never work (bad path, bad URI, failed authentication) raises StoreError at once."""
    backoff = backoff or Backoff(1.0, 30.0)
    attempts = 0
    while True:
        try:
            store = open_store(cfg)
        except StoreUnreachable as exc:
            attempts += 1
            delay = backoff.next()
            log.error("%s; retrying in %.1f s (attempt %d), not connecting to the broker meanwhile",
                      exc, delay, attempts)
            if stop.wait(delay):
                return None
            continue
        if attempts:
            log.info("store %s reachable after %d failed attempts", cfg.store, attempts)
        return store


__all__ = ["ENCODES_JSON", "MAX_REJECTED_PAYLOAD", "STORES", "AgentRecord", "Batch", "EncodedJSON", "Incoming",
           "LatestRecord", "RejectedRecord", "RequestRecord", "SERIES", "Stats", "Store", "StoreError", "StoreMissing",
           "StoreReader", "StoreUnreachable", "StoreWriter", "TrendRecord", "dead_letter", "describe", "open_reader",
           "open_store",
           "open_store_waiting", "refused"]
