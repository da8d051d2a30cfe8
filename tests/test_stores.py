"""One contract suite for every store: SQLite (a file per test) and MongoDB (a real server
when FLEET_TEST_MONGODB_URI is set, else mongomock; the test id says which ran)."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import mongomock
import pymongo
import pytest
from conftest import wait_for

from fleet_common import Request, Response, Status, iso
from fleet_persister.stores import Batch, Incoming, RejectedRecord, Stats, Store
from fleet_persister.stores.mongodb import MongoStore
from fleet_persister.stores.sqlite import SqliteStore

MONGO_URI = os.environ.get("FLEET_TEST_MONGODB_URI")
RETENTION = {"default": 3600, "processes": 60}
T0 = float(int(time.time()))  # near now: a real or mongomock TTL index deletes past expire_at
AGENT = "web-01"


@pytest.fixture(scope="module", autouse=True)
def mongomock_accepts_sort() -> Iterator[None]:
    """pymongo >= 4.11 passes `sort` to every bulk update; mongomock 4.3 does not know it yet."""
    builder: Any = mongomock.collection.BulkOperationBuilder
    original = builder.add_update

    def add_update(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    builder.add_update = add_update
    yield
    builder.add_update = original


@pytest.fixture(params=["sqlite", "mongodb"], ids=["sqlite", "mongodb[real]" if MONGO_URI else "mongodb[mongomock]"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "fleet.db"), RETENTION)
        yield s
        s.close()
        return
    client: Any = pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=5000) if MONGO_URI \
        else mongomock.MongoClient()
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    yield MongoStore(client, RETENTION, name)
    client.drop_database(name)
    client.close()


def req(id_: str, at: float = T0, type_: str = "cpu", expires_in: Optional[float] = 60.0,
        issued: bool = True, agent: str = AGENT) -> Incoming[Request]:
    return Incoming(Request(id=id_, type=type_, params={"limit": 5}, issued_at=iso(at) if issued else None,
                            expires_at=iso(at + expires_in) if expires_in is not None else None),
                    agent, iso(at + 0.005))


def res(id_: str, at: float = T0 + 0.140, type_: str = "cpu", code: Optional[str] = None,
        agent: str = AGENT) -> Incoming[Response]:
    if code is None:
        r = Response(id=id_, agent_id=agent, type=type_, status="ok", data={"percent": 12.5}, collected_at=iso(at))
    else:
        r = Response(id=id_, agent_id=agent, type=type_, status="error", collected_at=iso(at),
                     error={"code": code, "message": "x"})
    return Incoming(r, agent, iso(at + 0.010))


def status(online: bool, received: float, ts: Optional[float] = None, retained: bool = False) -> Incoming[Status]:
    extra: dict[str, Any] = {"hostname": "web-01.example", "platform": "Linux", "agent_version": "0.1.0",
                             "types": ["cpu", "ping"]} if online else {}
    return Incoming(Status(agent_id=AGENT, online=online, ts=iso(ts if ts is not None else received), **extra),
                    AGENT, iso(received), retained)


def test_request_then_response(store: Store) -> None:
    """A request stored pending is completed by its response: state, data, latency, retention."""
    store.write(Batch(requests=[req("r1")]))
    pending = store.get_request("r1")
    assert pending is not None and pending.state == "pending" and pending.latency_ms is None
    assert pending.params == {"limit": 5} and pending.expires_at == iso(T0 + 60)
    assert pending.expire_at == iso(T0 + 3600)
    store.write(Batch(responses=[res("r1")]))
    done = store.get_request("r1")
    assert done is not None
    assert (done.state, done.agent_id, done.type) == ("ok", AGENT, "cpu")
    assert done.issued_at == iso(T0) and done.answered_at == iso(T0 + 0.140)
    assert done.latency_ms == pytest.approx(140.0)
    assert done.data == {"percent": 12.5} and done.error is None
    assert done.expire_at == iso(T0 + 0.140 + 3600)


def test_response_then_request(store: Store) -> None:
    """A response stored first is not downgraded by its late request, which adds issued_at and latency."""
    store.write(Batch(responses=[res("r1")]))
    early = store.get_request("r1")
    assert early is not None and early.state == "ok" and early.issued_at is None and early.latency_ms is None
    store.write(Batch(requests=[req("r1")]))
    done = store.get_request("r1")
    assert done is not None
    assert done.state == "ok" and done.issued_at == iso(T0) and done.params == {"limit": 5}
    assert done.latency_ms == pytest.approx(140.0)
    assert done.expire_at == iso(T0 + 0.140 + 3600)


def test_duplicates_leave_one_record(store: Store) -> None:
    """The same request and response written twice, and in one batch together, give one identical record."""
    store.write(Batch(requests=[req("r1")], responses=[res("r1")]))
    first = store.get_request("r1")
    store.write(Batch(requests=[req("r1")], responses=[res("r1")]))
    store.write(Batch(requests=[req("r1")]))
    assert store.count_requests() == 1
    assert store.get_request("r1") == first
    assert first is not None and first.state == "ok" and first.latency_ms == pytest.approx(140.0)


def test_request_without_issued_at_gets_receive_time(store: Store) -> None:
    """A request with no issued_at (mosquitto_rr) is stamped with the time the persister received it."""
    store.write(Batch(requests=[req("r1", issued=False, expires_in=None)]))
    record = store.get_request("r1")
    assert record is not None and record.issued_at == iso(T0 + 0.005) and record.expires_at is None


def test_expire_pending(store: Store) -> None:
    """Only pending requests past expires_at plus the grace period become expired."""
    store.write(Batch(requests=[req("late"), req("answered"), req("no-expiry", expires_in=None),
                                req("later", expires_in=600)], responses=[res("answered")]))
    assert store.expire_pending(T0 + 62, grace_s=5) == 0
    assert store.expire_pending(T0 + 70, grace_s=5) == 1
    states = {i: store.get_request(i).state for i in ("late", "answered", "no-expiry", "later")}  # type: ignore[union-attr]
    assert states == {"late": "expired", "answered": "ok", "no-expiry": "pending", "later": "pending"}
    assert store.expire_pending(T0 + 70, grace_s=5) == 0


@pytest.mark.parametrize(("code", "state"), [("expired", "expired"), ("collector_failed", "error"),
                                             ("timeout", "error")])
def test_error_response_state(store: Store, code: str, state: str) -> None:
    """An error response is state error, except error code 'expired', which is state expired."""
    store.write(Batch(requests=[req("r1")], responses=[res("r1", code=code)]))
    record = store.get_request("r1")
    assert record is not None and record.state == state and record.data is None
    assert record.error == {"code": code, "message": "x"}


def test_agent_status_ordering(store: Store) -> None:
    """A status received before the stored one does not flip the agent; a Last Will older by ts still wins."""
    store.write(Batch(statuses=[status(True, received=T0 + 10)]))
    # the Last Will carries the ts of the connect that armed it, before the birth's ts
    store.write(Batch(statuses=[status(False, received=T0 + 20, ts=T0 + 9)]))
    store.write(Batch(statuses=[status(True, received=T0 + 15)]))  # a slow persister's stale write
    [agent] = store.agents()
    assert agent.agent_id == AGENT and agent.online is False
    assert agent.first_seen == iso(T0 + 10) and agent.last_seen == iso(T0 + 20)
    assert agent.status_at == iso(T0 + 20)
    assert (agent.hostname, agent.platform, agent.agent_version, agent.types) == \
        ("web-01.example", "Linux", "0.1.0", ["cpu", "ping"])
    store.write(Batch(statuses=[status(True, received=T0 + 30)]))
    assert store.agents()[0].online is True


def test_retained_status_does_not_move_last_seen(store: Store) -> None:
    """A retained Last Will replayed on subscribe sets the agent offline without making it look recently seen."""
    store.write(Batch(statuses=[status(False, received=T0 + 500, ts=T0 + 9, retained=True)]))
    [agent] = store.agents()
    assert agent.online is False and agent.last_seen == iso(T0 + 9) and agent.hostname is None


def test_response_bumps_last_seen(store: Store) -> None:
    """A response moves its agent's last_seen forward, and creates an agent of unknown status if new."""
    store.write(Batch(responses=[res("r1", at=T0 + 5)]))
    [agent] = store.agents()
    assert agent.online is None and agent.last_seen == iso(T0 + 5.010)
    store.write(Batch(statuses=[status(True, received=T0 + 6)]))
    store.write(Batch(responses=[res("r2", at=T0 + 50)]))
    [agent] = store.agents()
    assert agent.online is True and agent.first_seen == iso(T0 + 5.010) and agent.last_seen == iso(T0 + 50.010)


def test_rejected(store: Store) -> None:
    """Dead letters are stored as given, listed newest first, and a retried batch adds no duplicate."""
    batch = Batch(rejected=[RejectedRecord(id=f"x{i}", received_at=iso(T0 + i), topic=f"fleet/a/res/cpu{i}",
                                           reason="bad_json", payload="{nope") for i in range(3)])
    store.write(batch)
    store.write(batch)
    listed = store.rejected(limit=10)
    assert [r.id for r in listed] == ["x2", "x1", "x0"]
    assert listed[0] == batch.rejected[2]
    assert [r.id for r in store.rejected(limit=1)] == ["x2"]


def test_history_newest_first(store: Store) -> None:
    """history() returns one agent's requests of one type, newest first, limited and windowed."""
    store.write(Batch(requests=[req(f"r{i}", at=T0 + 60 * i) for i in range(4)]
                      + [req("other-type", type_="memory"), req("other-agent", agent="db-01")]))
    assert [r.id for r in store.history(AGENT, "cpu", limit=3)] == ["r3", "r2", "r1"]
    assert [r.id for r in store.history(AGENT, "cpu", limit=10, since_s=T0 + 120)] == ["r3", "r2"]
    assert store.history(AGENT, "disk", limit=10) == []


def test_agent_stats(store: Store) -> None:
    """agent_stats counts issued, answered, expired and error requests per agent, with median latency."""
    reqs = [req(f"r{i}", at=T0 + i) for i in range(7)]
    reqs += [req("old", at=T0 - 1000), req("b1", agent="db-01", expires_in=None)]
    answers = [res("r0", at=T0 + 0.100), res("r1", at=T0 + 1.300), res("r2", at=T0 + 2.200),
               res("r3", at=T0 + 3.400, code="collector_failed"), res("r4", at=T0 + 4.010, code="expired")]
    store.write(Batch(requests=reqs, responses=answers))
    store.expire_pending(T0 + 5.5 + 60, grace_s=0)
    stats = store.agent_stats(since_s=T0)
    assert stats[AGENT] == Stats(issued=7, answered=4, expired=2, errors=1, median_latency_ms=pytest.approx(250.0))
    assert stats["db-01"] == Stats(issued=1, answered=0, expired=0, errors=0, median_latency_ms=None)


def test_purge(store: Store) -> None:
    """purge() deletes requests past their retention (per type, else the default) and keeps the rest."""
    now = float(int(time.time()))  # not T0: a TTL index (mongomock's too) deletes past real time
    store.write(Batch(requests=[req("proc", at=now, type_="processes"), req("cpu", at=now)]))
    assert store.purge(now + 30) == 0
    assert store.purge(now + 120) == 1
    assert store.get_request("proc") is None and store.get_request("cpu") is not None
    assert store.count_requests(type_="cpu", state="pending") == 1


def test_type_counts(store: Store) -> None:
    """type_counts() gives requests per type and state (what `fleetctl up` summarises)."""
    store.write(Batch(requests=[req("c1"), req("c2"), req("m1", type_="memory")],
                      responses=[res("c1"), res("m1", type_="memory", code="collector_failed")]))
    assert store.type_counts() == {"cpu": {"ok": 1, "pending": 1}, "memory": {"error": 1}}


def test_latest_answer_per_agent(store: Store) -> None:
    """latest() gives each agent's newest ok answer of one type, skipping newer pending or failed
    requests, other types, and answers issued before `since_s`."""
    store.write(Batch(requests=[req("a1", at=T0), req("a2", at=T0 + 60), req("a3", at=T0 + 120),
                                req("a4", at=T0 + 180), req("m1", at=T0 + 200, type_="memory"),
                                req("b1", at=T0 + 10, agent="db-01"), req("c1", at=T0 - 500, agent="old-01")],
                      responses=[res("a1", at=T0 + 0.1), res("a2", at=T0 + 60.1),
                                 res("a3", at=T0 + 120.1, code="collector_failed"),
                                 res("m1", at=T0 + 200.1, type_="memory"),
                                 res("b1", at=T0 + 10.1, agent="db-01"), res("c1", at=T0 - 499.9, agent="old-01")]))
    latest = store.latest("cpu", since_s=T0 - 60)
    assert {a: r.id for a, r in latest.items()} == {AGENT: "a2", "db-01": "b1"}
    assert latest[AGENT].data == {"percent": 12.5} and latest[AGENT].state == "ok"
    assert set(store.latest("cpu")) == {AGENT, "db-01", "old-01"}
    assert {a: r.id for a, r in store.latest("memory").items()} == {AGENT: "m1"}
    assert store.latest("disk") == {}


def test_recent_requests_across_types(store: Store) -> None:
    """recent_requests() lists one agent's requests of every type, newest first, limited."""
    store.write(Batch(requests=[req(f"c{i}", at=T0 + 10 * i) for i in range(3)]
                      + [req("m0", at=T0 + 5, type_="memory"), req("p0", at=T0 + 25, type_="ping"),
                         req("x0", at=T0 + 30, agent="db-01")],
                      responses=[res("c2", at=T0 + 20.2)]))
    recent = store.recent_requests(AGENT, limit=10)
    assert [r.id for r in recent] == ["p0", "c2", "c1", "m0", "c0"]
    assert recent[1].state == "ok" and recent[1].latency_ms == pytest.approx(200.0)
    assert [r.id for r in store.recent_requests(AGENT, limit=2)] == ["p0", "c2"]
    assert store.recent_requests("nobody") == []


def test_sqlite_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    """The writer leaves copying the WAL into the database to a thread of its own (the writer
    itself would only at 64 MiB of WAL); the copy happens within a second, and close() ends it."""
    path = tmp_path / "fleet.db"
    s = SqliteStore(str(path), RETENTION)
    try:
        assert s._checkpointer is None, "a reader never starts it"
        batch = Batch()
        big = {"rows": [{"name": f"process-{i}", "pid": i} for i in range(2000)]}
        batch.responses.extend(
            Incoming(Response(id=f"r{i}", agent_id=AGENT, type="processes", status="ok", data=big,
                              collected_at=iso(T0)), AGENT, iso(T0)) for i in range(40))
        before = path.stat().st_size
        s.write(batch)
        assert s._checkpointer is not None and s._checkpointer.is_alive()
        wait_for(lambda: path.stat().st_size > before + 40 * 50_000, timeout_s=10,
                 what="the written pages copied into the database file")
    finally:
        s.close()
    assert s._checkpointer is not None and not s._checkpointer.is_alive()


def _open_at(path: str, start: Any, results: Any) -> None:
    start.wait()
    try:
        SqliteStore(path).close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_persisters_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path: Path) -> None:
    """Two or more persisters started at once (fleetctl, compose, a bench) create the same new file;
    SQLite refuses some of them 'database is locked' at once, without its busy timeout, and the store
    waits and tries again instead of exiting. Real processes, released together, ten times."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = str(tmp_path / f"fleet-{round_}.db")
        start, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_at, args=(path, start, results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(results.get(timeout=5) for _ in procs) == ["ok"] * 3, f"round {round_}"


def test_integers_past_64_bits_with_a_sign_are_stored(store: Store) -> None:
    """JSON (and SQLite) hold integers up to 2**64 - 1, BSON only to 2**63 - 1: a counter past that
    failed every write of its batch in MongoDB, for good. There it is now written as a float; SQLite
    keeps it exact. Everything else in the batch is stored unchanged."""
    data = {"big": 2**63 + 1, "max": 2**64 - 1, "low": -(2**63), "rows": [{"n": 2**63}, {"n": 7}]}
    batch = Batch()
    batch.responses.append(Incoming(Response(id="r-big", agent_id=AGENT, type="network", status="ok", data=data,
                                             collected_at=iso(T0)), AGENT, iso(T0)))
    batch.responses.append(res("r-small"))
    store.write(batch)
    stored = store.get_request("r-big")
    assert stored is not None and stored.data is not None
    assert stored.data["low"] == -(2**63) and type(stored.data["low"]) is int
    assert stored.data["rows"][1] == {"n": 7}
    for got, want in ((stored.data["big"], 2**63 + 1), (stored.data["max"], 2**64 - 1),
                      (stored.data["rows"][0]["n"], 2**63)):
        assert got == want if isinstance(store, SqliteStore) else (type(got) is float and got == float(want))
    assert store.get_request("r-small") is not None


def test_sqlite_writers_take_turns_through_a_lock_file(tmp_path: Path) -> None:
    """Persisters sharing one file wait for each other on `<file>.writer-lock` (polled each
    millisecond) rather than in SQLite's sleeps of up to 100 ms; a lock held past busy_timeout
    does not stop the write, SQLite's own lock then decides."""
    import fcntl
    import threading

    path = tmp_path / "fleet.db"
    s = SqliteStore(str(path), RETENTION, busy_timeout_ms=1500)
    other = open(str(path) + ".writer-lock", "a+b")
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        done = threading.Event()
        batch = Batch()
        batch.responses.append(res("r-turn"))
        writer = threading.Thread(target=lambda: (s.write(batch), done.set()))
        started = time.monotonic()
        writer.start()
        assert not done.wait(0.5), "the write waits its turn"
        fcntl.flock(other, fcntl.LOCK_UN)
        assert done.wait(5) and time.monotonic() - started < 1.4, "and goes as soon as the turn is free"
        writer.join()
        fcntl.flock(other, fcntl.LOCK_EX)  # held for good now: after busy_timeout the write goes anyway
        batch = Batch()
        batch.responses.append(res("r-late"))
        started = time.monotonic()
        s.write(batch)
        assert 1.4 < time.monotonic() - started < 5
        assert s.get_request("r-turn") is not None and s.get_request("r-late") is not None
    finally:
        other.close()
        s.close()
