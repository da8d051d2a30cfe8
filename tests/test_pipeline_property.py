"""Generated messages through the persister's parser and both stores' write path (Hypothesis):
well-formed envelopes with data a built-in type accepts, the same with any field or node changed
to any JSON, repeated keys, far-off times, random bytes, on request, response and status topics.
Whatever arrives is either stored exactly as it was validated or becomes a dead letter with a
reason: no other exception, and nothing half written."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import ANY_JSON, JSON_SCALARS, conforming

from fleet_common import Request, Response, Status, Topics, iso
from fleet_common.datatypes import BUILTIN
from fleet_persister.parsing import Ignored, parse_message
from fleet_store import Batch, EncodedJSON, Incoming, RejectedRecord, Store
from fleet_store.mongodb import MongoStore
from fleet_store.sqlite import SqliteStore

T = Topics("fleet")
TICKS = itertools.count()
AGENTS = ("web-01", "web-02")
TYPES = [*sorted(BUILTIN), "gpu_temp"]


@pytest.fixture(params=["sqlite", "mongodb[mongomock]"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """SQLite in a file, and the MongoDB store on mongomock (tests/test_stores.py runs the
    store contract on a real server when FLEET_TEST_MONGODB_URI is set)."""
    if request.param == "sqlite":
        s: Any = SqliteStore(str(tmp_path / "fleet.db"))
    else:
        s = MongoStore(mongomock.MongoClient(), database=f"prop_{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


pytestmark = pytest.mark.usefixtures("mongomock_accepts_sort")


def times(now: float) -> st.SearchStrategy[Any]:
    """Mostly now, sometimes far off, odd or not a time at all."""
    return st.one_of(st.just(iso(now)), st.floats(-6e10, 2.5e11).map(iso),
                     st.sampled_from(["9999-12-31T23:59:59.999Z", "0001-01-01T00:00:00.000Z",
                                      "9999-12-31T23:59:59.999-01:00", "2026-02-30T00:00:00Z", "yesterday"]),
                     JSON_SCALARS)


@st.composite
def messages(draw: Any, now: float) -> tuple[str, bytes, bool]:
    kind = draw(st.sampled_from(["req", "res", "res", "res", "status"]))
    agent, type_ = draw(st.sampled_from(AGENTS)), draw(st.sampled_from(TYPES))
    rid = draw(st.sampled_from(["r1", "r2", "r3"]))  # few ids: answers and requests meet
    if kind == "status":
        body: dict[str, Any] = Status(agent_id=agent, online=draw(st.booleans()), hostname=agent,
                                      types=["cpu"]).to_dict()
        topic = T.status(agent)
    elif kind == "req":
        body = Request(id=rid, type=type_, issued_at=iso(now), expires_at=iso(now + 60),
                       job=draw(st.sampled_from([None, None, "j1", "j2"]))).to_dict()
        topic = T.request(agent, type_)
    else:
        data = draw(conforming(BUILTIN[type_].data)) if type_ in BUILTIN else draw(ANY_JSON)
        body = Response.ok(rid, agent, type_, data if isinstance(data, dict) else {"value": data}, 1.0).to_dict()
        body["collected_at"] = iso(now)
        topic = T.response(agent, type_)
    change = draw(st.integers(0, 5))
    if change == 1 and body:  # one field anything
        body[draw(st.sampled_from(sorted(body)))] = draw(ANY_JSON)
    elif change == 2:  # a time far off or not a time
        body[draw(st.sampled_from(["collected_at", "issued_at", "expires_at", "ts"]))] = draw(times(now))
    elif change == 3:  # another agent's or type's id in the payload
        body.update(draw(st.sampled_from([{"agent_id": "web-02"}, {"type": "cpu"}, {"id": "r1"}])))
    payload = json.dumps(body).encode()
    if change == 4:  # a key twice
        payload = payload[:-1] + b', "' + draw(st.sampled_from(sorted(body) or ["x"])).encode() + b'": 1}'
    if change == 5:
        payload = draw(st.binary(max_size=40))
    return topic, payload, draw(st.booleans())


def stored_as_validated(store: Store, item: Incoming[Any]) -> None:
    """`item` (the last of its id in the batch) is in the store as the parser gave it, if it was
    its record's owner's."""
    message = item.message
    if isinstance(message, Response):
        rec = store.get_request(message.id)
        assert rec is not None
        if (rec.agent_id, rec.type) == (item.agent_id, message.type):
            data = json.loads(message.data) if isinstance(message.data, EncodedJSON) else message.data
            assert rec.data == data and rec.error == message.error, (rec, message)
    elif isinstance(message, Request):
        rec = store.get_request(message.id)
        assert rec is not None
        if rec.job is not None:  # the first request of the id decides it (the store tests show that)
            assert any(r.id == rec.id for r in store.job_requests(rec.job))
    else:
        assert any(a.agent_id == item.agent_id for a in store.agents())


@settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_a_generated_message_is_stored_as_validated_or_a_dead_letter_with_a_reason(store: Store,
                                                                                 data: st.DataObject) -> None:
    """Parser and store together: no exception escapes, a dead letter always has a reason and a
    detail, and what is stored is what the parser let through (or a request_mismatch dead letter)."""
    now = time.time() + next(TICKS) * 0.002  # each example its own receive time (the newest rows are its own)
    batch: list[tuple[Any, Any]] = []
    for _ in range(data.draw(st.integers(1, 6))):
        topic, payload, retained = data.draw(messages(now))
        encode = isinstance(store, SqliteStore) and data.draw(st.booleans())
        batch.append((parse_message(T, topic, payload, retained, now, encode=encode), payload))
    items = [i for i, _ in batch]
    for item, payload in batch:
        if isinstance(item, RejectedRecord):
            assert item.reason and item.topic and item.payload == payload[:2048].decode("utf-8", "replace")
        else:
            assert isinstance(item, (Incoming, Ignored)), item
    write = Batch(requests=[i for i in items if isinstance(i, Incoming) and isinstance(i.message, Request)],
                  responses=[i for i in items if isinstance(i, Incoming) and isinstance(i.message, Response)],
                  statuses=[i for i in items if isinstance(i, Incoming) and isinstance(i.message, Status)],
                  rejected=[i for i in items if isinstance(i, RejectedRecord)])
    turned_away = store.write(write)
    assert all(r.reason == "request_mismatch" and r.detail for r in turned_away)
    kept = {r.id for r in store.rejected(10 ** 9)}  # a displaced answer's letter has its own, older time
    assert {r.id for r in write.rejected} | {r.id for r in turned_away} <= kept
    last: dict[Any, Any] = {}
    for item in write.requests + write.statuses:
        stored_as_validated(store, item)
    for item in write.responses:  # of one id, the last answer of the record's owner is what stays
        rec = store.get_request(item.message.id)
        if rec is not None and (rec.agent_id, rec.type) == (item.agent_id, item.message.type):
            last[item.message.id] = item
    for item in last.values():
        stored_as_validated(store, item)
