"""Hourly trends on every store (SQLite, and MongoDB: a real server when FLEET_TEST_MONGODB_URI is
set, else mongomock): they equal a hand computation over a generated hour, a redelivered answer
is not counted twice, and they expire after persister.trend_retention_s while raw answers follow
persister.retention_s."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stores import STORE_KINDS, each_store
from trendcalc import Sent, as_table, assert_equal, expected, generated_hour

from fleet_common import Request, Response, iso
from fleet_store import Batch, EncodedJSON, Incoming, Store
from fleet_store.sqlite import SqliteStore
from fleet_store.trends import SERIES, Answer, roll_up, samples

MONGO_URI = os.environ.get("FLEET_TEST_MONGODB_URI")
RETENTION = {"default": 7200, "processes": 60}
TREND_RETENTION = 36000
HOUR = float(int(time.time()) // 3600 * 3600 - 3600)  # the last whole hour: near now, for TTL indexes

pytestmark = pytest.mark.usefixtures("mongomock_accepts_sort")


@pytest.fixture(**STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from each_store(request.param, tmp_path, RETENTION, trend_retention_s=TREND_RETENTION)


def answer(s: Sent, store: Store, received_s: float) -> Incoming[Response]:
    import orjson

    data: Any = EncodedJSON(orjson.dumps(s.data).decode()) if isinstance(store, SqliteStore) else s.data
    r = Response(id=s.id, agent_id=s.agent_id, type=s.type, status="ok", data=data, collected_at=iso(s.collected_s))
    return Incoming(r, s.agent_id, iso(received_s))


def request(s: Sent) -> Incoming[Request]:
    return Incoming(Request(id=s.id, type=s.type, issued_at=iso(s.collected_s - 0.1),
                            expires_at=iso(s.collected_s + 60)), s.agent_id, iso(s.collected_s - 0.09))


def stored(store: Store, agents: tuple[str, ...] = ("web-01", "db-01")) -> dict[Any, Any]:
    return as_table([r for a in agents for series in SERIES for r in store.trends(a, series, HOUR, HOUR + 3600)])


def write_in_batches(store: Store, sent: list[Sent], seed: int, received_s: float) -> None:
    """Requests and answers in batches of a few minutes each, shuffled within the batch; an answer
    sometimes before its request, sometimes in the batch after it."""
    rng = random.Random(seed)
    for start in range(0, len(sent), 24):
        chunk = sent[start:start + 24]
        batch = Batch(requests=[request(s) for s in chunk if rng.random() < 0.7],
                      responses=[answer(s, store, received_s) for s in chunk])
        rng.shuffle(batch.requests)
        rng.shuffle(batch.responses)
        store.write(batch)
        store.write(Batch(requests=[request(s) for s in chunk]))


def test_trends_equal_a_hand_computation_over_a_generated_hour(store: Store) -> None:
    """Hourly min, avg, max and count of every series of two simulated hosts, network rates from
    counter deltas (first answer without one, a counter reset skipped), equal the hand computation."""
    sent = generated_hour(HOUR, every_s=120, reset_at=12)
    write_in_batches(store, sent, 1, HOUR + 3700)
    want = expected(sent)
    assert {k[1] for k in want} == set(SERIES)
    assert_equal(stored(store), want)


def test_an_answer_written_again_is_not_counted_twice(store: Store) -> None:
    """A redelivered batch (the persister restarted before it acknowledged) and an answer repeated
    within a batch leave the trends as they were."""
    sent = generated_hour(HOUR)[:120]
    batch = Batch(responses=[answer(s, store, HOUR + 3700) for s in sent])
    store.write(batch)
    once = stored(store)
    store.write(batch)
    store.write(Batch(responses=batch.responses + batch.responses))
    assert stored(store) == once
    assert_equal(once, expected(sent))


def test_a_late_network_answer_gives_no_rate(store: Store) -> None:
    """A network answer older than the newest stored one is stored, but adds no rate: the rate over
    its time was counted already, from the answers either side of it."""
    sent = [s for s in generated_hour(HOUR, agents=("web-01",)) if s.type == "network"][:5]
    late = sent.pop(2)
    store.write(Batch(responses=[answer(s, store, HOUR + 3700) for s in sent]))
    before = stored(store, ("web-01",))
    store.write(Batch(responses=[answer(late, store, HOUR + 3701)]))
    assert stored(store, ("web-01",)) == before
    assert store.get_request(late.id) is not None
    assert_equal(before, expected(sent))


def test_values_that_are_not_finite_numbers_are_left_out() -> None:
    """NaN, infinities, booleans, strings and absurdly large numbers never reach an aggregate."""
    data = {"percent": math.nan, "load_avg": [math.inf, True, 1e300]}
    assert samples("cpu", data) == []
    assert samples("cpu", {"percent": "12", "load_avg": [0.5, None, -math.inf]}) == [("load1", "", 0.5)]
    rows = roll_up([Answer("a", "memory", iso(HOUR), {"virtual": {"percent": math.nan}, "swap": None}, iso(HOUR))],
                   {}, 3600)
    assert rows == []


def test_trends_expire_after_trend_retention_and_raw_answers_after_theirs(store: Store) -> None:
    """purge() with a clock past each retention, counted from when the persister received the answers:
    processes go first (60 s), then the other raw answers (7200 s), then the trends (36000 s after
    the end of the hour they were received in)."""
    received = float(int(time.time()))
    cpu = [s for s in generated_hour(HOUR, agents=("web-01",)) if s.type == "cpu"][:3]
    store.write(Batch(responses=[answer(s, store, received) for s in cpu]))
    store.write(Batch(requests=[Incoming(Request(id="p1", type="processes", issued_at=iso(received)),
                                         "web-01", iso(received))]))
    store.purge(received + 61)
    assert store.get_request("p1") is None and store.get_request(cpu[0].id) is not None
    store.purge(received + 7201)
    assert store.get_request(cpu[0].id) is None
    assert store.trends("web-01", "cpu_percent", HOUR, HOUR + 3600)[0].count == 3
    hour_end = received - received % 3600 + 3600  # trends go by whole hours of the persister's clock
    store.purge(hour_end + TREND_RETENTION - 1)
    assert len(store.trends("web-01", "cpu_percent", HOUR, HOUR + 3600)) == 1
    store.purge(hour_end + TREND_RETENTION + 1)
    assert store.trends("web-01", "cpu_percent", HOUR, HOUR + 3600) == []


def test_a_reader_of_a_store_made_before_trends_finds_none(tmp_path: Path) -> None:
    """A read-only reader (dashboard, fleetctl) of a file written before trends existed gets no
    trends rather than an error."""
    import sqlite3

    path = tmp_path / "old.db"
    sqlite3.connect(path).execute("CREATE TABLE requests (id TEXT PRIMARY KEY)").connection.close()
    reader = SqliteStore(str(path), read_only=True)
    try:
        assert reader.trends("web-01", "cpu_percent", HOUR, HOUR + 3600) == []
    finally:
        reader.close()


def test_rates_of_counters_near_two_to_the_64_are_exact() -> None:
    """Interface counters as large as 64 bits hold give exact rates (their delta is taken in integers)."""
    big = 2**64 - 10**6

    def net(at: float, value: int) -> Answer:
        return Answer("a", "network", iso(at), {"interfaces": [{"name": "eth0", "bytes_recv": value,
                                                                 "bytes_sent": value}]}, iso(at))

    rows = roll_up([net(HOUR, big), net(HOUR + 10, big + 12345)], {}, 3600)
    assert {(r.series, r.min, r.count) for r in rows} == {("network_rx_bytes_per_s", 1234.5, 1),
                                                          ("network_tx_bytes_per_s", 1234.5, 1)}


SHORT_HOUR = generated_hour(HOUR, agents=("web-01", "db-01"), every_s=300, reset_at=5)


@settings(max_examples=examples(40), deadline=None)
@given(cuts=st.lists(st.integers(0, len(SHORT_HOUR)), max_size=8), again=st.lists(st.integers(0, len(SHORT_HOUR) - 1),
                                                                                  max_size=6))
def test_any_batching_and_any_redelivery_give_the_hand_computation(cuts: list[int], again: list[int]) -> None:
    """However the answers of an hour (in time order) are cut into batches, and whichever of them are
    delivered again with the next batch (a restart before the ack), the trends equal the hand
    computation (SQLite)."""
    store = SqliteStore(":memory:", RETENTION, trend_retention_s=TREND_RETENTION)
    try:
        bounds = [0, *sorted(cuts), len(SHORT_HOUR)]
        for before, a, b in zip([0, *bounds], bounds, bounds[1:]):
            repeated = [SHORT_HOUR[i] for i in again if before <= i < a]  # the batch before, again
            store.write(Batch(responses=[answer(s, store, HOUR + 3700) for s in SHORT_HOUR[a:b] + repeated]))
        assert_equal(stored(store), expected(SHORT_HOUR))
    finally:
        store.close()


def test_an_answer_adds_a_bounded_number_of_keys() -> None:
    """Thousands of mount points, or a name of a megabyte, add at most 64 keys of 256 characters."""
    parts = [{"mountpoint": f"/m{i}", "percent": 1.0} for i in range(5000)] + [{"mountpoint": "/" * 10**6,
                                                                                "percent": 1.0}]
    found = samples("disk", {"partitions": parts})
    assert len(found) == 64 and all(len(key) <= 256 for _, key, _ in found)
