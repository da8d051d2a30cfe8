"""One contract suite for every store: SQLite (a file per test) and MongoDB (a real server
when FLEET_TEST_MONGODB_URI is set, else mongomock; the test id says which ran)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import pytest
from conftest import wait_for
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_common import Request, Response, Status, iso
from fleet_store import Batch, Incoming, RejectedRecord, Stats, Store
from fleet_store.mongodb import MongoStore
from fleet_store.sqlite import SqliteStore

MONGO_URI = os.environ.get("FLEET_TEST_MONGODB_URI")
RETENTION = {"default": 3600, "processes": 60}
T0 = float(int(time.time()))  # near now: a real or mongomock TTL index deletes past expire_at
AGENT = "web-01"


pytestmark = pytest.mark.usefixtures("mongomock_accepts_sort")


STORE_KINDS: dict[str, Any] = {"params": ["sqlite", "mongodb"],
                               "ids": ["sqlite", "mongodb[real]" if MONGO_URI else "mongodb[mongomock]"]}


def each_store(kind: str, tmp_path: Path, retention: dict[str, int], **options: Any) -> Iterator[Store]:
    """A fresh store of `kind`: SQLite in tmp_path, or MongoDB (a real server when
    FLEET_TEST_MONGODB_URI is set, else mongomock) in a database of its own, dropped after."""
    if kind == "sqlite":
        s = SqliteStore(str(tmp_path / "fleet.db"), retention, **options)
        yield s
        s.close()
        return
    client: Any = pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=5000) if MONGO_URI \
        else mongomock.MongoClient()
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    yield MongoStore(client, retention, name, **options)
    client.drop_database(name)
    client.close()


@pytest.fixture(**STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from each_store(request.param, tmp_path, RETENTION)


def req(id_: str, at: float = T0, type_: str = "cpu", expires_in: float | None = 60.0,
        issued: bool = True, agent: str = AGENT) -> Incoming[Request]:
    return Incoming(Request(id=id_, type=type_, params={"limit": 5}, issued_at=iso(at) if issued else None,
                            expires_at=iso(at + expires_in) if expires_in is not None else None),
                    agent, iso(at + 0.005))


def res(id_: str, at: float = T0 + 0.140, type_: str = "cpu", code: str | None = None,
        agent: str = AGENT) -> Incoming[Response]:
    if code is None:
        r = Response(id=id_, agent_id=agent, type=type_, status="ok", data={"percent": 12.5}, collected_at=iso(at))
    else:
        r = Response(id=id_, agent_id=agent, type=type_, status="error", collected_at=iso(at),
                     error={"code": code, "message": "x"})
    return Incoming(r, agent, iso(at + 0.010))


def status(online: bool, received: float, ts: float | None = None, retained: bool = False) -> Incoming[Status]:
    extra: dict[str, Any] = {"hostname": "web-01.example", "platform": "Linux", "agent_version": "0.1.0",
                             "types": ["cpu", "ping"]} if online else {}
    return Incoming(Status(agent_id=AGENT, online=online, ts=iso(ts if ts is not None else received), **extra),
                    AGENT, iso(received), retained)


def test_request_then_response(store: Store) -> None:
    """A request stored pending is completed by its response: state, data, latency, and retention
    counted from when the persister received each (its clock, not the sender's)."""
    store.write(Batch(requests=[req("r1")]))
    pending = store.get_request("r1")
    assert pending is not None and pending.state == "pending" and pending.latency_ms is None
    assert pending.params == {"limit": 5} and pending.expires_at == iso(T0 + 60)
    assert pending.expire_at == iso(T0 + 0.005 + 3600)
    store.write(Batch(responses=[res("r1")]))
    done = store.get_request("r1")
    assert done is not None
    assert (done.state, done.agent_id, done.type) == ("ok", AGENT, "cpu")
    assert done.issued_at == iso(T0) and done.answered_at == iso(T0 + 0.140)
    assert done.latency_ms == pytest.approx(140.0)
    assert done.data == {"percent": 12.5} and done.error is None
    assert done.expire_at == iso(T0 + 0.150 + 3600)
    assert (done.collected_at, done.received_at) == (iso(T0 + 0.140), iso(T0 + 0.150))


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
    assert done.expire_at == iso(T0 + 0.150 + 3600)


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
    requests, other types, and answers answered before `since_s` (tests/test_latest.py: the table)."""
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


# ----------------------------------------------------------------------------- answers bound to requests

def answer(id_: str, agent: str, type_: str = "cpu", at: float = T0 + 0.140) -> Incoming[Response]:
    """An answer whose data says who sent it and for which type, so a record can be checked against it."""
    return Incoming(Response(id=id_, agent_id=agent, type=type_, status="ok", data={"from": agent, "kind": type_},
                             collected_at=iso(at)), agent, iso(at + 0.010))


def holds_own_data(store: Store) -> None:
    """No record names one agent (or type) while holding another's data."""
    for type_ in ("cpu", "memory"):
        for agent in ("web-01", "web-02", "web-03"):
            for rec in store.history(agent, type_, limit=1000):
                if rec.data is not None:
                    assert rec.data == {"from": rec.agent_id, "kind": rec.type}, rec


def test_an_answer_from_another_agent_does_not_fill_a_request(store: Store) -> None:
    """Request-first: another agent's answer carrying the request's id is a dead letter; the record stays the
    request's, and its own agent's answer still fills it."""
    store.write(Batch(requests=[req("r1", agent="web-01")]))
    turned = store.write(Batch(responses=[answer("r1", "web-02")]))
    assert [(r.reason, json.loads(r.payload)["agent_id"]) for r in turned] == [("request_mismatch", "web-02")]
    rec = store.get_request("r1")
    assert rec is not None and (rec.agent_id, rec.state, rec.data) == ("web-01", "pending", None)
    store.write(Batch(responses=[answer("r1", "web-01")]))
    rec = store.get_request("r1")
    assert rec is not None and rec.state == "ok" and rec.data == {"from": "web-01", "kind": "cpu"}
    assert [d.reason for d in store.rejected()] == ["request_mismatch"]
    assert "which was sent to agent 'web-01'" in store.rejected()[0].detail


def test_an_answer_stored_before_another_agents_request_is_displaced(store: Store) -> None:
    """Answer-first: an answer stored before its request, from another agent, leaves when the request comes
    (to rejected, with its data); the request's own agent then fills the record."""
    store.write(Batch(responses=[answer("r1", "web-02")]))
    early = store.get_request("r1")
    assert early is not None and early.agent_id == "web-02"
    turned = store.write(Batch(requests=[req("r1", agent="web-01")]))
    assert [r.reason for r in turned] == ["request_mismatch"]
    dead = json.loads(turned[0].payload)
    assert (dead["agent_id"], dead["data"]) == ("web-02", {"from": "web-02", "kind": "cpu"})
    rec = store.get_request("r1")
    assert rec is not None and (rec.agent_id, rec.state, rec.data, rec.issued_at) == ("web-01", "pending", None,
                                                                                       iso(T0))
    store.write(Batch(responses=[answer("r1", "web-01")]))
    assert store.get_request("r1").data == {"from": "web-01", "kind": "cpu"}  # type: ignore[union-attr]
    assert store.count_requests() == 1 and [d.reason for d in store.rejected()] == ["request_mismatch"]


def test_an_answer_on_another_type_does_not_fill_a_request(store: Store) -> None:
    """A cpu request is not filled by its own agent's answer on res/memory, in either order."""
    store.write(Batch(requests=[req("r1")], responses=[answer("r1", AGENT, "memory")]))
    store.write(Batch(responses=[answer("r2", AGENT, "memory")]))
    store.write(Batch(requests=[req("r2")]))
    for id_ in ("r1", "r2"):
        rec = store.get_request(id_)
        assert rec is not None and (rec.type, rec.state, rec.data) == ("cpu", "pending", None)
    assert [d.reason for d in store.rejected()] == ["request_mismatch"] * 2


def test_a_request_id_sent_again_to_another_agent_is_a_dead_letter(store: Store) -> None:
    """The first request of an id decides whose it is; the same id sent to another agent (or for another
    type) later is recorded in rejected, not silently ignored."""
    store.write(Batch(requests=[req("r1", agent="web-01")]))
    turned = store.write(Batch(requests=[req("r1", agent="web-02"), req("r1", type_="memory")]))
    assert [r.reason for r in turned] == ["request_mismatch", "request_mismatch"]
    assert "was sent to agent 'web-01' for type 'cpu' already" in turned[0].detail
    rec = store.get_request("r1")
    assert rec is not None and (rec.agent_id, rec.type) == ("web-01", "cpu")
    assert len(store.rejected()) == 2


def test_a_retried_write_keeps_one_dead_letter_per_refusal(store: Store) -> None:
    """Dead letters the store makes have ids made from the message, so writing the batch again
    (as after a failed attempt) adds none."""
    store.write(Batch(requests=[req("r1")]))
    bad = Batch(responses=[answer("r1", "web-02")])
    store.write(bad)
    store.write(bad)
    assert len(store.rejected()) == 1


IDS = ("x1", "x2", "x3")
AGENTS = ("web-01", "web-02", "web-03")
KINDS = ("cpu", "memory")


@st.composite
def arrivals(draw: Any) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str, str]], list[bool]]:
    """One request per id (the controller's ids are unique) and answers from any agent, for any type and
    id, arriving in any order and cut into batches anywhere."""
    owners = {id_: (draw(st.sampled_from(AGENTS)), draw(st.sampled_from(KINDS))) for id_ in IDS}
    answers = draw(st.lists(st.tuples(st.sampled_from(AGENTS), st.sampled_from(KINDS), st.sampled_from(IDS)),
                            max_size=8))
    messages = [("req", a, t, i) for i, (a, t) in owners.items()] + [("res", a, t, i) for a, t, i in answers]
    order = draw(st.permutations(messages))
    cuts = draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    return owners, order, cuts


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=arrivals())
def test_whatever_the_order_each_record_is_its_requests_and_holds_only_its_agents_answer(
        store: Store, case: tuple[dict[str, tuple[str, str]], list[tuple[str, str, str, str]], list[bool]]) -> None:
    """Generated arrival orders and batchings of requests and answers (answer-first, request-first, foreign
    answers, wrong types, duplicates): each record ends as its request's, holding its own agent's answer
    or none, and every foreign answer is a dead letter. The own answer is stored whenever it arrives with
    or after the request, or before it with no other sender's answer ahead of it (the one case the order
    decides: two senders answering one id before its request, see docs/reliability.md, "Bad input")."""
    owners, order, cuts = case
    tag = uuid.uuid4().hex[:6]  # the store fixture lives across examples: ids of their own
    batch, batch_no, arrived = Batch(), 0, []
    for (kind, agent, type_, id_), cut in zip(order, cuts):
        if kind == "req":
            batch.requests.append(req(f"{tag}{id_}", type_=type_, agent=agent))
        else:
            batch.responses.append(answer(f"{tag}{id_}", agent, type_))
        arrived.append((batch_no, kind, agent, type_, id_))
        if cut:
            store.write(batch)
            batch, batch_no = Batch(), batch_no + 1
    store.write(batch)
    for id_, (agent, type_) in owners.items():
        rec = store.get_request(f"{tag}{id_}")
        at = next(b for b, k, _, _, i in arrived if k == "req" and i == id_)
        early = [(a, t) for b, k, a, t, i in arrived if k == "res" and i == id_ and b < at]
        answered = (early[:1] == [(agent, type_)] or
                    any(k == "res" and (a, t, i) == (agent, type_, id_) and b >= at for b, k, a, t, i in arrived))
        assert rec is not None and (rec.agent_id, rec.type) == (agent, type_)
        assert rec.data == ({"from": agent, "kind": type_} if answered else None), (rec, order, cuts)
        assert rec.state == ("ok" if answered else "pending")
    foreign = {(a, t, f"{tag}{i}") for k, a, t, i in order if k == "res" and owners[i] != (a, t)}
    own = {(a, t, f"{tag}{i}") for i, (a, t) in owners.items()}
    dead = {(p["agent_id"], p["type"], p["id"]) for p in (json.loads(d.payload) for d in store.rejected(10000))
            if p.get("id", "").startswith(tag)}
    assert foreign <= dead <= foreign | own
    holds_own_data(store)


# ----------------------------------------------------------------------------- time from the persister

def test_an_agent_clock_an_hour_off_does_not_move_answered_at_or_latency(store: Store) -> None:
    """answered_at is the agent's collected_at only where it agrees with the request and the persister's
    receipt; an agent an hour ahead or behind gets the receipt time, and latency stays the real one."""
    for id_, skew in (("ahead", 3600.0), ("behind", -3600.0), ("right", 0.0)):
        store.write(Batch(requests=[req(id_)]))
        r = Response(id=id_, agent_id=AGENT, type="cpu", status="ok", data={"percent": 1.0},
                     collected_at=iso(T0 + 0.140 + skew))
        store.write(Batch(responses=[Incoming(r, AGENT, iso(T0 + 0.150))]))
    ahead, behind, right = (store.get_request(i) for i in ("ahead", "behind", "right"))
    assert right is not None and right.answered_at == iso(T0 + 0.140) and right.latency_ms == pytest.approx(140)
    for rec in (ahead, behind):
        assert rec is not None and rec.answered_at == iso(T0 + 0.150) and rec.latency_ms == pytest.approx(150)
        assert rec.expire_at == iso(T0 + 0.150 + 3600)


def test_an_answer_that_waited_in_an_outbox_keeps_its_collection_time(store: Store) -> None:
    """An answer collected long before it reached the persister (the agent's outbox after an outage) keeps
    the time it was collected: the agent's clock agrees with the request's."""
    store.write(Batch(requests=[req("waited", at=T0 - 1800)]))
    r = Response(id="waited", agent_id=AGENT, type="cpu", status="ok", data={"percent": 1.0},
                 collected_at=iso(T0 - 1800 + 0.5))
    store.write(Batch(responses=[Incoming(r, AGENT, iso(T0))]))
    rec = store.get_request("waited")
    assert rec is not None and rec.answered_at == iso(T0 - 1800 + 0.5) and rec.latency_ms == pytest.approx(500)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"])
def test_timestamps_at_either_end_of_rfc_3339_are_stored_as_they_are(store: Store, text: str) -> None:
    """Year 0001 and year 9999 are written and read back with milliseconds, and retention, counted from the
    persister's receipt, is unaffected."""
    store.write(Batch(requests=[Incoming(Request(id="edge", type="cpu", issued_at=text, expires_at=text),
                                         AGENT, iso(T0))]))
    rec = store.get_request("edge")
    assert rec is not None and rec.issued_at == text and rec.expires_at == text
    assert rec.expire_at == iso(T0 + 3600)


def test_importing_the_stores_loads_no_mqtt_code() -> None:
    """fleet_store and both its stores import without paho: reading the store needs no MQTT."""
    code = ("import fleet_store, fleet_store.sqlite, fleet_store.mongodb, sys; "
            "loaded = sorted(m for m in sys.modules if m.startswith('paho')); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_birth_sets_labels_and_a_goodbye_keeps_them(store: Store) -> None:
    """Labels come from the newest birth (none given is none); a Last Will leaves them as they are."""
    def birth(received: float, labels: dict[str, str] | None) -> Incoming[Status]:
        return Incoming(Status(agent_id=AGENT, online=True, ts=iso(received), types=["cpu"], labels=labels),
                        AGENT, iso(received))
    store.write(Batch(statuses=[birth(T0 + 1, {"role": "web", "dc": "ams"})]))
    assert store.agents()[0].labels == {"role": "web", "dc": "ams"}
    store.write(Batch(statuses=[status(False, received=T0 + 2)]))
    assert store.agents()[0].labels == {"role": "web", "dc": "ams"}
    store.write(Batch(statuses=[birth(T0 + 3, {"role": "db"})]))
    assert store.agents()[0].labels == {"role": "db"}
    store.write(Batch(statuses=[birth(T0 + 2.5, {"role": "stale"})]))  # received before the stored one
    assert store.agents()[0].labels == {"role": "db"}
    store.write(Batch(statuses=[birth(T0 + 4, None)]))
    assert store.agents()[0].labels == {}


def job_req(id_: str, job: str | None, agent: str = AGENT, at: float = T0) -> Incoming[Request]:
    return Incoming(Request(id=id_, type="ping", issued_at=iso(at), expires_at=iso(at + 3600), job=job),
                    agent, iso(at + 0.005))


def test_a_jobs_requests_are_read_back_by_its_id_whatever_the_order(store: Store) -> None:
    """requests.job holds the request's job, also when the answer came first; job_requests reads
    the job's records by agent, and no other job's or the controller's."""
    store.write(Batch(requests=[job_req("a1", "job1", "web-01"), job_req("b1", "job1", "db-01"),
                                job_req("c1", "job2", "web-01"), job_req("d1", None, "web-01")]))
    store.write(Batch(responses=[res("e1", type_="ping", agent="app-01")]))  # its request comes later
    store.write(Batch(requests=[job_req("e1", "job1", "app-01")]))
    store.write(Batch(responses=[res("a1", type_="ping", agent="web-01")]))
    found = store.job_requests("job1")
    assert [(r.agent_id, r.id, r.job) for r in found] == [("app-01", "e1", "job1"), ("db-01", "b1", "job1"),
                                                          ("web-01", "a1", "job1")]
    assert [r.state for r in found] == ["ok", "pending", "ok"]
    assert [r.id for r in store.job_requests("job2")] == ["c1"]
    assert store.job_requests("nope") == []
    rec = store.get_request("d1")
    assert rec is not None and rec.job is None


def test_a_request_sent_again_keeps_its_first_job(store: Store) -> None:
    """A request id is one request: a copy naming another job, or a job where the first named none
    (a replay), does not move it into that job."""
    store.write(Batch(requests=[job_req("a1", "job1"), job_req("c1", None)]))
    store.write(Batch(requests=[job_req("a1", "job2"), job_req("c1", "job2")]))
    assert [r.id for r in store.job_requests("job1")] == ["a1"]
    assert store.job_requests("job2") == []
    rec = store.get_request("c1")
    assert rec is not None and rec.job is None


def test_an_older_sqlite_file_gets_the_job_column_and_its_index(tmp_path: Path) -> None:
    """A database made before jobs existed is given requests.job and its index when opened."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE requests (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, type TEXT NOT NULL, "
                     "params TEXT, issued_at TEXT, expires_at TEXT, state TEXT NOT NULL DEFAULT 'pending', "
                     "answered_at TEXT, latency_ms REAL, data TEXT, error TEXT, expire_at TEXT);"
                     "INSERT INTO requests (id, agent_id, type) VALUES ('old1', 'web-01', 'cpu');")
    db.close()
    s = SqliteStore(str(path), RETENTION)
    try:
        s.write(Batch(requests=[job_req("n1", "job1")]))
        assert [r.id for r in s.job_requests("job1")] == ["n1"]
        old = s.get_request("old1")
        assert old is not None and old.job is None
        plan = s._query("EXPLAIN QUERY PLAN SELECT id FROM requests WHERE job = ?", ("job1",))
        assert any("requests_job" in str(row) for row in plan), plan
    finally:
        s.close()
