"""Stage `storage`: what the stores keep per host per day, per type, on their own write paths.

For each request type, simulated hosts (fleet_sim.synthetic: realistic shapes and sizes) send
the answers of `hours` simulated hours at the default schedule (controller.schedule). Each
request and answer is parsed as the persister parses it and written through the store's
write() in batches, the type into a fresh SQLite file of its own, so that table and index sizes
(SQLite's dbstat) belong to that type alone. Figures are scaled to one day.

MongoDB: mongomock keeps no files, so what is reported is the BSON size of the stored
documents (bson.encode), document bytes and not on-disk size; with FLEET_BENCH_MONGODB_URI
set, a real server's collStats (storage and index sizes, after compression) are reported too.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fleet_sim.synthetic import Host

from fleet_common.config import DEFAULT_SCHEDULE, PersisterConfig
from fleet_common.messages import Request, ok_response_payload
from fleet_common.timefmt import iso
from fleet_common.topics import Topics
from fleet_persister.parsing import parse_message
from fleet_store import Batch, Incoming, Store

DAY_S = 86400
# What the real agent answers to the controller's params-less processes request: its top 50
# (the simulator lists all 250 unless asked, the heavy case the ingest stages are about).
AGENT_READING_PARAMS: dict[str, dict[str, Any]] = {"processes": {"limit": 50}}
BATCH = 500
FLEET = 10_000


@dataclass(frozen=True)
class StorageSizes:
    hosts: int = 20
    hours: int = 2


TINY_STORAGE = StorageSizes(hosts=2, hours=1)


def _messages(type_: str, sizes: StorageSizes, start_s: float, topics: Topics,
              encode: bool) -> Iterator[Incoming[Any]]:
    """Request then answer, for every host and every due time of `type_` in the window, in time order."""
    every = DEFAULT_SCHEDULE[type_]
    hosts = [(f"sim-{i:05d}", Host(f"sim-{i:05d}")) for i in range(sizes.hosts)]
    t = start_s
    while t < start_s + sizes.hours * 3600:
        for agent_id, host in hosts:
            req = Request(id=uuid.uuid4().hex, type=type_, issued_at=iso(t), expires_at=iso(t + every))
            yield cast(Incoming[Any], parse_message(topics, topics.request(agent_id, type_), req.payload(), False,
                                                    t, encode))
            data = host.reading(type_, AGENT_READING_PARAMS.get(type_, {}))
            answer = ok_response_payload(req.id, agent_id, type_, data, 0.5, iso(t + 0.004))
            yield cast(Incoming[Any], parse_message(topics, topics.response(agent_id, type_), answer, False,
                                                    t + 0.01, encode))
        t += every


def _write_all(store: Store, items: Iterator[Incoming[Any]]) -> tuple[int, float]:
    """Messages written, and the CPU seconds of this process spent in write() (not in making
    them): CPU, not wall time, so that other work on the machine moves the figure less."""
    batch, n, spent = Batch(), 0, 0.0

    def write() -> float:
        started = time.process_time()
        store.write(batch)
        return time.process_time() - started

    for item in items:
        (batch.requests if isinstance(item.message, Request) else batch.responses).append(item)
        n += 1
        if len(batch) >= BATCH:
            spent += write()
            batch = Batch()
    if len(batch):
        spent += write()
    return n, spent


def _sqlite_sizes(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {name: int(size) for name, size in db.execute(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")}


def _grown(objects: dict[str, int], empty: dict[str, int]) -> dict[str, int]:
    """What each table and index took beyond the page it has in an empty store."""
    return {name: size - empty.get(name, 0) for name, size in objects.items()}


DENSITY_HOSTS = 1000


def trend_density(path: Path, workdir: Path) -> int | None:
    """Trend bytes per host per day at scale. The write path's few hours of a few hosts fill a page
    or two, so the rows it made for its first host (one hour of that type) are written again, with
    the host and the hour changed, as the persister adds them (hour by hour, every host each hour)
    for DENSITY_HOSTS hosts and a day, into a fresh store; the table and index pages are counted."""
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE name = 'trends'")]
        if not names:
            return None
        first = db.execute("SELECT MIN(hour) FROM trends WHERE agent_id = 'sim-00000'").fetchone()[0]
        template = db.execute("SELECT series, key, count, sum, min, max, expire_at FROM trends "
                              "WHERE agent_id = 'sim-00000' AND hour = ?", (first,)).fetchall()
    if not template:
        return 0
    from fleet_store.sqlite import UPSERT_TREND, SqliteStore  # a store without trends has none

    target = workdir / f"density-{path.stem}.db"
    store = SqliteStore(str(target))
    empty = _sqlite_sizes(target)
    start = time.time() - time.time() % 3600
    with sqlite3.connect(target, isolation_level=None) as db:
        for h in range(24):
            hour = iso(start + h * 3600)
            db.execute("BEGIN")
            db.executemany(UPSERT_TREND, [(f"sim-{i:05d}", series, key, hour, n, total, low, high, exp)
                                          for i in range(DENSITY_HOSTS)
                                          for series, key, n, total, low, high, exp in template])
            db.execute("COMMIT")
    store.close()
    grown = _grown(_sqlite_sizes(target), empty)
    return round(sum(size for name, size in grown.items() if "trend" in name) / DENSITY_HOSTS)


def _per_day(value: float, sizes: StorageSizes) -> int:
    return round(value / sizes.hosts * 24 / sizes.hours)


def sqlite_type(type_: str, sizes: StorageSizes, start_s: float, workdir: Path) -> dict[str, Any]:
    from fleet_store.sqlite import SqliteStore

    path = workdir / f"{type_}.db"
    store = SqliteStore(str(path), PersisterConfig().retention_s)
    empty = _sqlite_sizes(path)
    messages, spent = _write_all(store, _messages(type_, sizes, start_s, Topics("fleet"), True))
    answers = messages // 2
    store.close()
    objects = _grown(_sqlite_sizes(path), empty)
    with sqlite3.connect(path) as db:
        data = int(db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM requests").fetchone()[0])
    indexes = {n: s for n, s in objects.items() if n.startswith(("requests_", "sqlite_autoindex_requests"))}
    return {
        "answers_per_host_per_day": _per_day(answers, sizes),
        "write_cpu_ms_per_1000_answers": round(1000 * spent / answers * 1000, 1),
        "data_json_bytes_per_host_per_day": _per_day(data, sizes),
        "requests_table_bytes_per_host_per_day": _per_day(objects.get("requests", 0), sizes),
        "requests_indexes_bytes_per_host_per_day": _per_day(sum(indexes.values()), sizes),
        "trends_bytes_per_host_per_day_here": _per_day(sum(s for n, s in objects.items() if "trend" in n), sizes),
        "trends_bytes_per_host_per_day": trend_density(path, workdir) or 0,
        "raw_bytes_per_host_per_day": _per_day(sum(s for n, s in objects.items() if "trend" not in n), sizes),
        "objects_bytes_grown": dict(sorted(objects.items())),
    }


def mongodb_type(type_: str, sizes: StorageSizes, start_s: float) -> dict[str, Any]:
    import bson
    import mongomock
    import pymongo

    from fleet_store.mongodb import MongoStore

    uri = os.environ.get("FLEET_BENCH_MONGODB_URI")
    client: Any = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) if uri else mongomock.MongoClient()
    name = f"fleet_bench_{uuid.uuid4().hex[:10]}"
    _mongomock_accepts_sort()
    store = MongoStore(client, PersisterConfig().retention_s, name)
    answers = _write_all(store, _messages(type_, sizes, start_s, Topics("fleet"), False))[0] // 2
    out: dict[str, Any] = {"answers_per_host_per_day": _per_day(answers, sizes)}
    for coll in sorted(client[name].list_collection_names()):
        docs = sum(len(bson.encode(d)) for d in client[name][coll].find())
        if docs:
            out[f"{coll}_document_bytes_per_host_per_day"] = _per_day(docs, sizes)
        if uri:
            st = client[name].command("collStats", coll)
            out[f"{coll}_storage_bytes_per_host_per_day"] = _per_day(st["storageSize"], sizes)
            out[f"{coll}_index_bytes_per_host_per_day"] = _per_day(st["totalIndexSize"], sizes)
    client.drop_database(name)
    client.close()
    return out


def _mongomock_accepts_sort() -> None:
    """pymongo >= 4.11 passes `sort` to every bulk update; mongomock 4.3 does not know it yet."""
    from mongomock import collection

    builder: Any = collection.BulkOperationBuilder
    original: Callable[..., Any] = builder.add_update
    if getattr(original, "accepts_sort", False):
        return

    def add_update(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    add_update.accepts_sort = True  # type: ignore[attr-defined]
    builder.add_update = add_update


def _retention(type_: str) -> int:
    ret = PersisterConfig().retention_s
    return ret.get(type_, ret["default"])


def fleet_cost(per_type: dict[str, dict[str, Any]], key: str, trend_retention_s: int | None) -> dict[str, Any]:
    """What FLEET hosts keep on disk at steady state under the default retention, and a year of it."""
    raw = sum(f[key] for f in per_type.values())
    kept = sum(f[key] * _retention(t) / DAY_S for t, f in per_type.items())
    trends_day = sum(f.get("trends_bytes_per_host_per_day", 0) for f in per_type.values())
    trends_kept = trends_day * (trend_retention_s or 0) / DAY_S
    year_trends = trends_day * min(365, (trend_retention_s or 0) / DAY_S)
    return {"raw_bytes_per_host_per_day": round(raw), "trends_bytes_per_host_per_day": round(trends_day),
            "steady_state_bytes_per_host": round(kept + trends_kept),
            "steady_state_gb_10k_hosts": round(FLEET * (kept + trends_kept) / 1e9, 1),
            "year_of_history_gb_10k_hosts": round(FLEET * (kept + year_trends) / 1e9, 1)}


def storage(sizes: StorageSizes, stores: tuple[str, ...] = ("sqlite", "mongodb")) -> dict[str, Any]:
    # A recent, whole hour: a TTL index (mongomock's too) deletes what is past expire_at by real time.
    start_s = float(int(time.time()) // 3600 * 3600 - sizes.hours * 3600)
    types = sorted(DEFAULT_SCHEDULE)
    out: dict[str, Any] = {"hosts": sizes.hosts, "hours": sizes.hours, "schedule_s": dict(DEFAULT_SCHEDULE),
                           "retention_s": dict(PersisterConfig().retention_s),
                           "trend_retention_s": getattr(PersisterConfig(), "trend_retention_s", None)}
    with tempfile.TemporaryDirectory(prefix="fleet-storage-") as tmp:
        if "sqlite" in stores:
            out["sqlite"] = {t: sqlite_type(t, sizes, start_s, Path(tmp)) for t in types}
            out["sqlite_fleet"] = fleet_cost(out["sqlite"], "raw_bytes_per_host_per_day", out["trend_retention_s"])
    if "mongodb" in stores:
        out["mongodb"] = {t: mongodb_type(t, sizes, start_s) for t in types}
        out["mongodb_measure"] = ("real server collStats" if os.environ.get("FLEET_BENCH_MONGODB_URI")
                                  else "BSON document bytes (mongomock: not on-disk size)")
    return out


def table(result: dict[str, Any]) -> list[tuple[str, Any, str]]:
    rows: list[tuple[str, Any, str]] = []
    for type_, f in (result.get("sqlite") or {}).items():
        mongo = (result.get("mongodb") or {}).get(type_, {})
        rows.append((f"storage: sqlite {type_} bytes/host/day raw", f["raw_bytes_per_host_per_day"],
                     f"write {f.get('write_cpu_ms_per_1000_answers', 0):,} CPU ms/1000; "
                     f"data {f['data_json_bytes_per_host_per_day']:,}, indexes "
                     f"{f['requests_indexes_bytes_per_host_per_day']:,}, trends {f['trends_bytes_per_host_per_day']:,};"
                     f" mongodb documents {mongo.get('requests_document_bytes_per_host_per_day', 0):,}"
                     f" + trends {mongo.get('trends_document_bytes_per_host_per_day', 0):,}"))
    fleet = result.get("sqlite_fleet")
    if fleet:
        rows += [("storage: sqlite bytes/host/day, raw + trends",
                  f"{fleet['raw_bytes_per_host_per_day']:,} + {fleet['trends_bytes_per_host_per_day']:,}", ""),
                 ("storage: sqlite 10,000 hosts at steady state, GB", fleet["steady_state_gb_10k_hosts"],
                  f"a year of history: {fleet['year_of_history_gb_10k_hosts']:,} GB")]
    return rows
