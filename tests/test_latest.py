"""The `latest` table (collection): one row per agent and type holding its newest ok answer, on
both stores (the `store` fixture of test_stores: SQLite in a file, MongoDB real or mongomock).

It never moves backwards whatever the arrival order, only ever holds its own agent's and type's
data, is written with the batch (a batch SQLite refuses changes neither requests nor latest),
outlives retention, and is filled from requests when a database made before it is opened."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_stores import AGENT, AGENTS, IDS, KINDS, RETENTION, T0, answer, arrivals, req, res, store

from fleet_common import Request, Response, iso
from fleet_store import Batch, Incoming, LatestRecord, RejectedRecord, Store
from fleet_store.mongodb import MongoStore
from fleet_store.sqlite import SqliteStore

__all__ = ["store"]  # the fixture, shared with test_stores

pytestmark = pytest.mark.usefixtures("mongomock_accepts_sort")


def reading(id_: str, agent: str, type_: str = "cpu", at: float = T0, received: float | None = None,
            ok: bool = True) -> Incoming[Response]:
    """An answer whose data names its request, collected at `at` (so answered at `at`: the request is
    issued before it and the persister receives it after)."""
    if ok:
        r = Response(id=id_, agent_id=agent, type=type_, status="ok", data={"id": id_, "agent": agent},
                     collected_at=iso(at))
    else:
        r = Response(id=id_, agent_id=agent, type=type_, status="error", collected_at=iso(at),
                     error={"code": "collector_failed", "message": "x"})
    return Incoming(r, agent, iso(received if received is not None else at + 0.01))


def asked(id_: str, agent: str, type_: str = "cpu") -> Incoming[Request]:
    return Incoming(Request(id=id_, type=type_, issued_at=iso(T0 - 1), expires_at=iso(T0 + 3600)), agent,
                    iso(T0 - 1 + 0.005))


def key_of(store: Store, agent: str, type_: str = "cpu") -> LatestRecord | None:
    found = [r for r in store.latest_all([type_]) if r.agent_id == agent]
    assert len(found) <= 1
    return found[0] if found else None


def test_latest_rows_are_the_newest_ok_answer_per_agent_and_type(store: Store) -> None:
    """latest_all() gives one row per agent and type, sorted, with the newest ok answer's id, time and data;
    error and expired answers, and pending requests, leave it; `types` picks types."""
    store.write(Batch(requests=[asked(i, a, t) for i, a, t in (("c1", "web-01", "cpu"), ("c2", "web-01", "cpu"),
                                                               ("c3", "web-01", "cpu"), ("m1", "web-01", "memory"),
                                                               ("d1", "db-01", "cpu"), ("p1", "db-01", "memory"))],
                      responses=[reading("c1", "web-01", at=T0 + 1), reading("c2", "web-01", at=T0 + 2),
                                 reading("c3", "web-01", at=T0 + 3, ok=False),
                                 reading("m1", "web-01", "memory", at=T0 + 1), reading("d1", "db-01", at=T0 + 5)]))
    expired = Response(id="c4", agent_id="web-01", type="cpu", status="error", collected_at=iso(T0 + 4),
                       error={"code": "expired", "message": "x"})
    store.write(Batch(requests=[asked("c4", "web-01")], responses=[Incoming(expired, "web-01", iso(T0 + 4.01))]))
    assert store.latest_all() == [
        LatestRecord("db-01", "cpu", "d1", iso(T0 + 5), {"id": "d1", "agent": "db-01"}),
        LatestRecord("web-01", "cpu", "c2", iso(T0 + 2), {"id": "c2", "agent": "web-01"}),
        LatestRecord("web-01", "memory", "m1", iso(T0 + 1), {"id": "m1", "agent": "web-01"})]
    assert [(r.agent_id, r.type) for r in store.latest_all(["memory", "disk"])] == [("web-01", "memory")]
    assert store.latest_all([]) == []
    latest = store.latest("cpu")
    assert {a: (r.id, r.state, r.answered_at, r.data) for a, r in latest.items()} == {
        "db-01": ("d1", "ok", iso(T0 + 5), {"id": "d1", "agent": "db-01"}),
        "web-01": ("c2", "ok", iso(T0 + 2), {"id": "c2", "agent": "web-01"})}
    assert set(store.latest("cpu", since_s=T0 + 3)) == {"db-01"}


def test_latest_outlives_the_retention_of_its_request(store: Store) -> None:
    """purge() deletes requests, not latest rows: the newest answer of an agent stays known."""
    now = float(int(time.time()))
    store.write(Batch(requests=[req("p1", at=now, type_="processes")], responses=[res("p1", at=now + 0.1,
                                                                                      type_="processes")]))
    assert store.purge(now + 120) == 1 and store.get_request("p1") is None
    assert [(r.id, r.type) for r in store.latest_all()] == [("p1", "processes")]


@st.composite
def one_series(draw: Any) -> tuple[list[tuple[str, str, float, bool]], list[bool]]:
    """Requests and answers of one agent and type (ok or error, times that may tie), each answer sent one to
    three times, in any order and batching: late older answers, duplicates, answers before requests."""
    n = draw(st.integers(1, 6))
    times = [T0 + draw(st.integers(0, 4)) for _ in range(n)]
    oks = [draw(st.booleans()) for _ in range(n)]
    messages = [("req", f"i{k}", times[k], oks[k]) for k in range(n)]
    for k in range(n):
        messages += [("res", f"i{k}", times[k], oks[k])] * draw(st.integers(1, 3))
    order = draw(st.permutations(messages))
    cuts = draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    return order, cuts


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=one_series())
def test_latest_never_moves_backwards_in_any_arrival_order(
        store: Store, case: tuple[list[tuple[str, str, float, bool]], list[bool]]) -> None:
    """After every write the row is the newest ok answer written so far (by answered_at, then id), never an
    older one than before; after all of them it is the newest ok answer of all."""
    order, cuts = case
    agent = f"a-{uuid.uuid4().hex[:8]}"  # the store lives across examples: an agent of its own
    batch, written, seen = Batch(), [], None
    for n, ((kind, id_, at, ok), cut) in enumerate(zip(order, cuts)):
        id_ = f"{agent}-{id_}"
        if kind == "req":
            batch.requests.append(asked(id_, agent))
        else:
            batch.responses.append(reading(id_, agent, at=at, received=T0 + 10 + n, ok=ok))
            written.append((at, id_, ok))
        if cut or n == len(order) - 1:
            store.write(batch)
            batch = Batch()
            row = key_of(store, agent)
            best = max(((iso(a), i) for a, i, good in written if good), default=None)
            assert ((row.answered_at, row.id) if row else None) == best, (row, order, cuts)
            if seen is not None:
                assert row is not None and (row.answered_at, row.id) >= seen
            seen = (row.answered_at, row.id) if row else None
            if row is not None:
                assert row.data == {"id": row.id, "agent": agent}


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=arrivals())
def test_latest_holds_only_its_own_agents_and_types_answers(
        store: Store, case: tuple[dict[str, tuple[str, str]], list[tuple[str, str, str, str]], list[bool]]) -> None:
    """Whatever the order of requests and answers from any agent for any type and id (test_stores' arrivals:
    foreign answers, wrong types, answers stored before a request that displaces them): every latest row is
    the newest ok record the store holds for its agent and type, and holds that agent's data for that type."""
    _owners, order, cuts = case
    tag = uuid.uuid4().hex[:6]
    batch = Batch()
    for (kind, agent, type_, id_), cut in zip(order, cuts):
        if kind == "req":
            batch.requests.append(req(f"{tag}{id_}", type_=type_, agent=f"{agent}-{tag}"))
        else:
            batch.responses.append(answer(f"{tag}{id_}", f"{agent}-{tag}", type_))
        if cut:
            store.write(batch)
            batch = Batch()
    store.write(batch)
    records = [r for r in (store.get_request(f"{tag}{i}") for i in IDS) if r is not None and r.state == "ok"]
    for agent in AGENTS:
        for type_ in KINDS:
            mine = [r for r in records if (r.agent_id, r.type) == (f"{agent}-{tag}", type_)]
            newest = max(mine, key=lambda r: (r.answered_at, r.id), default=None)
            row = key_of(store, f"{agent}-{tag}", type_)
            assert (row.id if row else None) == (newest.id if newest else None), (row, newest, order, cuts)
            if row is not None:
                assert row.data == {"from": f"{agent}-{tag}", "kind": type_} and row.answered_at == newest.answered_at


def test_a_displaced_answer_leaves_latest(store: Store) -> None:
    """An answer stored before its request, from another agent, is that agent's latest until the request comes
    and displaces it; then that agent's latest goes back to its own newest ok record, or there is none."""
    store.write(Batch(requests=[asked("own", "web-02")], responses=[reading("own", "web-02", at=T0)]))
    store.write(Batch(responses=[reading("x1", "web-02", at=T0 + 5), reading("x2", "web-03", at=T0 + 5)]))
    assert key_of(store, "web-02").id == "x1"  # type: ignore[union-attr]
    turned = store.write(Batch(requests=[asked("x1", "web-01"), asked("x2", "web-01")]))
    assert len(turned) == 2
    assert key_of(store, "web-02").id == "own"  # type: ignore[union-attr]
    assert key_of(store, "web-03") is None and key_of(store, "web-01") is None


def test_a_late_request_moves_latest_with_its_answer(store: Store) -> None:
    """An answer collected before its (late) request was issued, by more than the clocks' tolerance, is answered
    when the persister received it (base.answer_time): latest follows the record's answered_at."""
    store.write(Batch(responses=[reading("r1", AGENT, at=T0, received=T0 + 30)]))
    assert key_of(store, AGENT).answered_at == iso(T0)  # type: ignore[union-attr]
    store.write(Batch(requests=[Incoming(Request(id="r1", type="cpu", issued_at=iso(T0 + 20)), AGENT,
                                         iso(T0 + 20))]))
    rec = store.get_request("r1")
    assert rec is not None and rec.answered_at == iso(T0 + 30)
    assert key_of(store, AGENT).answered_at == iso(T0 + 30)  # type: ignore[union-attr]


def test_a_batch_sqlite_refuses_changes_neither_requests_nor_latest(tmp_path: Path) -> None:
    """latest is written in the batch's transaction: a batch that fails after its latest upsert (here at its
    last statement, a dead letter SQLite cannot bind) leaves requests and latest as they were."""
    store = SqliteStore(str(tmp_path / "fleet.db"), RETENTION)
    try:
        store.write(Batch(requests=[asked("old", AGENT)], responses=[reading("old", AGENT, at=T0)]))
        before = (store.latest_all(), store.get_request("old"), store.count_requests())
        bad = RejectedRecord(id="bad", received_at=iso(T0), topic="t", reason="bad_json", payload=object())  # type: ignore[arg-type]
        batch = Batch(requests=[asked("new", AGENT)], responses=[reading("new", AGENT, at=T0 + 9)], rejected=[bad])
        with pytest.raises(sqlite3.Error) as caught:
            store.write(batch)
        assert store.refuses(caught.value)
        assert (store.latest_all(), store.get_request("old"), store.count_requests()) == before
        assert store.get_request("new") is None
        batch.rejected.clear()  # as the persister does: the batch without the message at fault
        store.write(batch)
        assert [r.id for r in store.latest_all()] == ["new"]
    finally:
        store.close()


def test_a_batch_mongodb_refuses_leaves_latest_and_its_retry_completes_it() -> None:
    """MongoDB writes a batch as idempotent bulk writes, not a transaction: latest is written last, from what
    requests then hold. A batch refused before that (here a dead letter BSON cannot hold) leaves latest as it
    was, and the batch retried without it brings requests and latest together."""
    client: Any = mongomock.MongoClient()
    store = MongoStore(client, RETENTION, "fleet_latest_refused")
    store.write(Batch(requests=[asked("old", AGENT)], responses=[reading("old", AGENT, at=T0)]))
    before = store.latest_all()
    bad = RejectedRecord(id="bad", received_at=iso(T0), topic="t", reason="bad_json", payload=object())  # type: ignore[arg-type]
    batch = Batch(requests=[asked("new", AGENT)], responses=[reading("new", AGENT, at=T0 + 9)], rejected=[bad])
    with pytest.raises(Exception) as caught:
        store.write(batch)
    assert store.refuses(caught.value)
    assert store.latest_all() == before
    batch.rejected.clear()
    store.write(batch)
    assert [r.id for r in store.latest_all()] == ["new"] and store.get_request("new").state == "ok"  # type: ignore[union-attr]


def test_a_sqlite_file_made_before_latest_gets_it_filled_on_open(tmp_path: Path) -> None:
    """A database without the latest table (an earlier release) gets it, filled from the ok records, when a
    writer opens it; a read-only reader of such a file reads the same from requests meanwhile."""
    path = str(tmp_path / "fleet.db")
    store = SqliteStore(path, RETENTION)
    store.write(Batch(requests=[asked(i, a) for i, a in (("a1", "web-01"), ("a2", "web-01"), ("b1", "web-02"))],
                      responses=[reading("a1", "web-01", at=T0 + 2), reading("a2", "web-01", at=T0 + 1),
                                 reading("b1", "web-02", at=T0 + 3, ok=False)]))
    expected = store.latest_all()
    assert [r.id for r in expected] == ["a1"]
    store._db.execute("DROP TABLE latest")
    store.close()
    reader = SqliteStore(path, RETENTION, read_only=True)
    assert reader.latest_all() == expected and set(reader.latest("cpu")) == {"web-01"}
    reader.close()
    store = SqliteStore(path, RETENTION)
    assert store.latest_all() == expected
    store.close()


def test_a_mongodb_database_made_before_latest_gets_it_filled_on_open() -> None:
    """The same for MongoDB: a database without the latest collection gets it filled when a store opens it."""
    client: Any = mongomock.MongoClient()
    store = MongoStore(client, RETENTION, "fleet_latest_backfill")
    store.write(Batch(requests=[asked(i, a) for i, a in (("a1", "web-01"), ("a2", "web-01"), ("b1", "web-02"))],
                      responses=[reading("a1", "web-01", at=T0 + 2), reading("a2", "web-01", at=T0 + 1),
                                 reading("b1", "web-02", at=T0 + 3, ok=False)]))
    expected = store.latest_all()
    assert [r.id for r in expected] == ["a1"]
    store.db.drop_collection("latest")
    assert MongoStore(client, RETENTION, "fleet_latest_backfill").latest_all() == expected


def test_latest_with_fields_hands_over_only_those_keys(store: Store) -> None:
    """latest(fields=...) cuts each answer down in the store to the named top-level keys (null where
    absent), so a fleet's processes lists never reach the reader; a name that is not a plain key is refused."""
    now = time.time()  # not T0: processes are kept 60 s here, and a TTL index deletes them after
    data = {"processes": [{"pid": i} for i in range(50)], "total": 312, "sort_by": "cpu_percent"}
    answer_ = Incoming(Response(id="p1", agent_id=AGENT, type="processes", status="ok", data=data,
                                collected_at=iso(now + 0.1)), AGENT, iso(now + 0.11))
    store.write(Batch(requests=[req("p1", at=now, type_="processes")], responses=[answer_]))
    [full] = store.latest("processes").values()
    assert full.data == data
    [cut] = store.latest("processes", fields=["total", "missing"]).values()
    assert cut.data == {"total": 312, "missing": None} and cut.id == "p1" and cut.answered_at == full.answered_at
    assert [r.data for r in store.latest("processes", fields=[]).values()] == [{}]
    for bad in ("total') --", "a.b", "$where", ""):
        with pytest.raises(ValueError):
            store.latest("processes", fields=[bad])
