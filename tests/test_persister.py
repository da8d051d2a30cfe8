"""The fleet-persister process against a real Mosquitto: what it stores, what it rejects,
and how it stops. The SQLite file is read directly: its layout is part of the contract."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import psutil
import pytest
from conftest import BIN, Procs, wait_for
from helpers import loads, parse_workers_of, rows, running
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import Request, Response, Topics, iso, new_id
from fleet_common.config import load_config
from fleet_common.datatypes import example
from fleetctl.broker import EmbeddedBroker, free_port

AGENT = "web-01"


@pytest.fixture
def publisher(broker: EmbeddedBroker) -> Iterator[Callable[..., None]]:
    """publish(topic, payload, retain=False): QoS 1, returns once the broker has it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    yield publish
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def topics(prefix: str) -> Topics:
    return Topics(prefix)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


@pytest.fixture
def start_persister(procs: Procs, write_config: Callable[..., Path]) -> Callable[..., subprocess.Popen[bytes]]:
    """Start fleet-persister (with these persister settings) and return once it has subscribed."""

    def start(**persister: Any) -> subprocess.Popen[bytes]:
        return procs.start_persister(write_config(persister=persister))

    return start


def request(id_: str, issued_s: float, type_: str = "cpu", expires_in_s: float = 60) -> Request:
    return Request(id=id_, type=type_, issued_at=iso(issued_s), expires_at=iso(issued_s + expires_in_s))


def one(db: Path, id_: str) -> dict[str, Any] | None:
    found = rows(db, "SELECT * FROM requests WHERE id = ?", id_)
    return found[0] if found else None


# Parsed on the network thread (0) and in worker processes (2): the same rows either way.
WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["parse-here", "parse-workers"])


@WORKERS
def test_requests_and_responses_are_stored(start_persister: Callable[..., Any], publisher: Callable[..., None],
                                           topics: Topics, db: Path, workers: int) -> None:
    """Requests and their responses end as one row each with state, data and latency; unanswered ones expire."""
    start_persister(parse_workers=workers)
    now = time.time() - 1.0  # the request a second ago, its answer collected 0.25 s after it
    ok, late, lost = new_id(), new_id(), new_id()
    publisher(topics.request(AGENT, "cpu"), request(ok, now).payload())
    publisher(topics.request(AGENT, "cpu"), request(late, now).payload())
    publisher(topics.request(AGENT, "cpu"), request(lost, now - 30, expires_in_s=1).payload())
    data = example("cpu", percent=12.5)
    publisher(topics.response(AGENT, "cpu"), Response(
        id=ok, agent_id=AGENT, type="cpu", status="ok", data=data, collected_at=iso(now + 0.25)).payload())
    publisher(topics.response(AGENT, "cpu"), Response.fail(late, AGENT, "cpu", "expired", "too late").payload())

    wait_for(lambda: (one(db, ok) or {}).get("state") == "ok", what="the answered request stored as ok")
    row = one(db, ok)
    assert row is not None
    assert row["agent_id"] == AGENT and row["type"] == "cpu" and loads(row["params"]) == {}
    assert loads(row["data"]) == data and row["error"] is None
    assert row["issued_at"] == iso(now) and row["answered_at"] == iso(now + 0.25)
    assert row["latency_ms"] == pytest.approx(250.0, abs=1.0)
    wait_for(lambda: (one(db, late) or {}).get("state") == "expired", what="error code expired stored as expired")
    assert loads(one(db, late)["error"])["code"] == "expired"  # type: ignore[index]
    wait_for(lambda: (one(db, lost) or {}).get("state") == "expired", what="the sweep to expire the lost request")
    assert rows(db, "SELECT last_seen FROM agents WHERE agent_id = ?", AGENT), "a response makes its agent known"


BAD_RESPONSES: list[tuple[str, Any]] = [
    ("bad_json", b'{"id": "r1", '),
    ("not_utf8", b'{"id": "\xff\xfe"}'),
    ("empty_payload", b""),
    ("agent_id_mismatch", {"agent_id": "db-01"}),
    ("type_mismatch", {"type": "memory"}),
    ("bad_key", {"data": {"$where": "1"}}),
    ("not_object", b"[1, 2, 3]"),
]


@WORKERS
def test_bad_payloads_are_rejected_and_persister_goes_on(start_persister: Callable[..., Any],
                                                         publisher: Callable[..., None], topics: Topics,
                                                         db: Path, workers: int) -> None:
    """Each kind of bad response ends in `rejected` with a precise reason; a good one after them is still stored."""
    proc = start_persister(parse_workers=workers)
    good = Response.ok(new_id(), AGENT, "cpu", example("cpu", percent=1.0), 1.0).to_dict()
    for _, bad in BAD_RESPONSES:
        payload = bad if isinstance(bad, bytes) else json.dumps({**good, "id": new_id(), **bad}).encode()
        publisher(topics.response(AGENT, "cpu"), payload)
    publisher(topics.response(AGENT, "cpu"), json.dumps(good).encode())

    wait_for(lambda: one(db, good["id"]), what="the good response after the bad ones")
    dead = wait_for(lambda: (r := rows(db, "SELECT * FROM rejected")) and len(r) >= len(BAD_RESPONSES)
                    and r, what="every bad response in rejected")
    assert sorted(d["reason"] for d in dead) == sorted(reason for reason, _ in BAD_RESPONSES)
    assert {d["topic"] for d in dead} == {topics.response(AGENT, "cpu")}
    by_reason = {d["reason"]: d for d in dead}
    assert by_reason["bad_json"]["payload"] == '{"id": "r1", '
    assert by_reason["not_utf8"]["payload"] == '{"id": "\ufffd\ufffd"}'  # decoded with errors='replace'
    assert by_reason["empty_payload"]["payload"] == ""
    assert all(d["received_at"].endswith("Z") for d in dead)
    assert proc.poll() is None, "the persister must keep running after bad input"


def test_same_response_twice_leaves_one_record(start_persister: Callable[..., Any],
                                               publisher: Callable[..., None], topics: Topics, db: Path) -> None:
    """A response delivered twice (and its request after it) is one record, and nothing is rejected."""
    start_persister()
    now = time.time() - 1.0
    rid = new_id()
    answer = Response(id=rid, agent_id=AGENT, type="ping", status="ok", data={}, collected_at=iso(now + 0.1))
    publisher(topics.response(AGENT, "ping"), answer.payload())
    publisher(topics.response(AGENT, "ping"), answer.payload())
    publisher(topics.request(AGENT, "ping"), request(rid, now, type_="ping").payload())
    marker = new_id()
    publisher(topics.request(AGENT, "ping"), request(marker, now, type_="ping").payload())
    wait_for(lambda: one(db, marker), what="the marker published after the duplicates")
    assert rows(db, "SELECT state, latency_ms FROM requests WHERE id = ?", rid) == [{"state": "ok",
                                                                                    "latency_ms": 100.0}]
    assert rows(db, "SELECT * FROM rejected") == []


@WORKERS
def test_sigterm_commits_queued_messages_and_exits_0(start_persister: Callable[..., Any], procs: Procs,
                                                     publisher: Callable[..., None], topics: Topics,
                                                     db: Path, workers: int) -> None:
    """On SIGTERM the persister commits and acknowledges what it has queued, then exits 0."""
    # queued messages wait for a batch that never fills
    proc = start_persister(batch_wait_s=30, batch_size=10000, parse_workers=workers)
    children = psutil.Process(proc.pid).children()
    parse_workers = parse_workers_of(proc.pid)
    assert len(parse_workers) == workers
    ids = [new_id() for _ in range(50)]
    for id_ in ids:
        publisher(topics.request(AGENT, "memory"), request(id_, time.time(), type_="memory").payload())
    wait_for(lambda: procs.log("persister").count(f"on {topics.request(AGENT, 'memory')}") >= len(ids),
             what="all requests queued by the persister")
    assert rows(db, "SELECT COUNT(*) AS n FROM requests WHERE type = 'memory'") == [{"n": 0}]
    assert procs.stop("persister", signal.SIGTERM) == 0
    assert rows(db, "SELECT COUNT(*) AS n FROM requests WHERE type = 'memory'") == [{"n": len(ids)}]
    assert not [w for w in parse_workers if running(w)], "the parse workers ended with the persister"
    # spawn's resource tracker is no worker: it leaves when it reads the end of its pipe,
    # which can be a moment after the persister has gone
    wait_for(lambda: not [c for c in children if running(c)], what="no process of the persister left over")
    assert "stopped: received" in procs.log("persister")
    queued_before = procs.log("persister").count(f"on {topics.request(AGENT, 'memory')}")
    start_persister()  # same client id and session: anything unacknowledged would be redelivered now
    assert procs.log("persister").count(f"on {topics.request(AGENT, 'memory')}") == queued_before, \
        "messages committed before the stop were acknowledged, so none comes back"


def test_store_that_cannot_be_opened_is_one_line_exit_2(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """A SQLite path that cannot be created fails start-up with one plain line naming the key, exit 2."""
    (tmp_path / "a-file").write_text("")
    config = write_config(persister={"sqlite_path": str(tmp_path / "a-file" / "fleet.db")})
    done = subprocess.run([str(BIN / "fleet-persister"), "--config", str(config)], capture_output=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "persister.sqlite_path" in lines[0], lines


def test_bad_config_is_one_line_exit_2(write_config: Callable[..., Path]) -> None:
    """An unknown persister config key fails start-up with one line naming the key, exit 2."""
    config = write_config(persister={"batch_sise": 10})
    done = subprocess.run([str(BIN / "fleet-persister"), "--config", str(config)], capture_output=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines() == [
        done.stderr.decode().strip()] and "persister.batch_sise" in done.stderr.decode()


@pytest.mark.slow
def test_locked_database_loses_nothing(start_persister: Callable[..., Any], procs: Procs,
                                       publisher: Callable[..., None], topics: Topics, db: Path) -> None:
    """While the database is locked nothing is acknowledged or lost; the batch is stored once the lock goes."""
    start_persister()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    rid = new_id()
    try:
        publisher(topics.request(AGENT, "disk"), request(rid, time.time(), type_="disk").payload())
        wait_for(lambda: "store write failed" in procs.log("persister"), what="the failed write to be logged")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: one(db, rid), what="the request stored after the lock is released")
    # the recovery line follows the commit, so the row can be visible a moment before it
    wait_for(lambda: "store write succeeded again" in procs.log("persister"), what="the recovery logged")
    assert procs.log("persister").count("store write failed") == 1, "logged once, not per retry"


@pytest.mark.slow
def test_a_backlog_is_taken_a_window_at_a_time(start_persister: Callable[..., Any], procs: Procs,
                                               publisher: Callable[..., None], topics: Topics, db: Path,
                                               tmp_path: Path, write_config: Callable[..., Path]) -> None:
    """Mosquitto 2.0.11 stops keeping to the Receive Maximum once acks flow, and would hand a
    returning persister its whole backlog to hold in memory. The persister bounds what it holds
    itself: received and not yet stored never exceeds its queue, one batch and the message in hand."""
    heartbeat = tmp_path / "persister.heartbeat.json"
    settings = dict(receive_maximum=100, batch_size=50, heartbeat_path=str(heartbeat), heartbeat_interval_s=0.05)
    start_persister(**settings)  # creates the session that keeps the backlog
    assert procs.stop("persister") == 0
    ids = [new_id() for _ in range(1000)]
    row = example("processes")["processes"][0]
    data = example("processes", processes=[{**row, "name": f"process-{i}", "pid": i, "rss": i * 4096}
                                           for i in range(100)])
    for id_ in ids:
        publisher(topics.response(AGENT, "processes"), Response.ok(id_, AGENT, "processes", data, 1.0).payload())
    heartbeat.unlink(missing_ok=True)
    procs.start("persister", "fleet-persister", "--config", str(write_config(persister=settings)))
    held: list[int] = []
    done = threading.Event()

    def slow_store() -> None:  # the store locked two thirds of the time: acks flow, slowly
        blocker = sqlite3.connect(db, isolation_level=None)
        while not done.is_set():
            blocker.execute("BEGIN EXCLUSIVE")
            time.sleep(0.2)
            blocker.execute("ROLLBACK")
            time.sleep(0.1)
        blocker.close()

    slow = threading.Thread(target=slow_store)
    slow.start()

    def drained() -> bool:
        try:
            c = json.loads(heartbeat.read_text())["counters"]
        except (OSError, ValueError):
            return False
        held.append(c["received"] - c["stored"] - sum(c["rejected"].values()))
        return bool(c["stored"] >= len(ids))

    try:
        wait_for(drained, timeout_s=120, interval_s=0.02, what="the backlog stored")
    finally:
        done.set()
        slow.join()
    assert max(held) <= 100 + 50 + 1 + 1, f"held up to {max(held)} messages at once"
    print(f"held at most {max(held)} in {len(held)} samples")
    assert len(held) > 10, "sampled while it drained"
    assert {r["id"] for r in rows(db, "SELECT id FROM requests")} >= set(ids)


@pytest.mark.slow
def test_unreachable_mongodb_at_start_is_retried_with_backoff(procs: Procs, write_config: Callable[..., Path]) -> None:
    """MongoDB not answering at start-up (nothing on the port): the persister logs one line per attempt
    naming the URI and the next delay, does not connect to the broker meanwhile, and SIGTERM ends it with
    exit 0 and no traceback."""
    port = free_port()  # nothing listens there
    config = write_config(persister={"store": "mongodb", "mongodb_uri": f"mongodb://127.0.0.1:{port}/"})
    procs.start("persister", "fleet-persister", "--config", str(config))
    wait_for(lambda: "retrying in" in procs.log("persister"), 30, what="the first failed attempt logged")
    assert procs.procs["persister"].poll() is None, "it must wait for the store, not exit"
    assert procs.stop("persister", signal.SIGTERM, timeout_s=10) == 0
    text = procs.log("persister")
    assert f"cannot reach MongoDB at mongodb://127.0.0.1:{port}/" in text and "(attempt 1)" in text
    assert "stopped before the store was reachable" in text
    assert "Traceback" not in text and "connected to broker" not in text


def test_bad_mongodb_uri_is_one_line_exit_2(write_config: Callable[..., Path]) -> None:
    """A MongoDB URI that can never work is a configuration error: one line naming the key, exit 2."""
    config = write_config(persister={"store": "mongodb", "mongodb_uri": "mongodb://user:pw@host:notaport/"})
    done = subprocess.run([str(BIN / "fleet-persister"), "--config", str(config)], capture_output=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "persister.mongodb_uri" in lines[0] and "pw" not in lines[0], lines


class RefusingStore:
    """The real SQLite store, refusing every write that holds one chosen request id, as a store
    refuses a value it cannot hold (ValueError: Store.refuses says a retry cannot help)."""

    def __init__(self, inner: Any, poison: str) -> None:
        self.inner, self.poison, self.refusals = inner, poison, 0

    def write(self, batch: Any) -> Any:
        if any(i.message.id == self.poison for i in [*batch.requests, *batch.responses]):
            self.refusals += 1
            raise ValueError(f"cannot hold the value of {self.poison}")
        return self.inner.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_message_the_store_refuses_is_isolated_and_the_rest_is_stored(
        broker: EmbeddedBroker, write_config: Callable[..., Path], publisher: Callable[..., None],
        topics: Topics, db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A batch the store refuses for one message's value is split until that message is found: it goes to
    rejected (store_refused, with the store's error) and is acknowledged; the other messages of the batch
    are stored, and so is what comes after."""
    from fleet_persister.persister import Persister
    from fleet_store import open_store

    caplog.set_level(logging.INFO, logger="fleet")
    cfg = load_config(str(write_config(persister={"batch_wait_s": 0.5, "parse_workers": 0})))
    ids = [new_id() for _ in range(40)]
    poison = ids[17]
    store = RefusingStore(open_store(cfg.persister), poison)
    persister = Persister(cfg, store)  # type: ignore[arg-type]
    stop = threading.Event()
    runner = threading.Thread(target=persister.run, args=(stop,), name="persister-under-test")
    runner.start()
    try:
        assert persister.ready.wait(20), "the persister's subscriptions were not acknowledged"
        for id_ in ids:
            publisher(topics.response(AGENT, "ping"), Response.ok(id_, AGENT, "ping", {}, 1.0).payload())
        wait_for(lambda: len(rows(db, "SELECT id FROM requests")) == 39, 30, what="the 39 others stored")
        after = new_id()
        publisher(topics.response(AGENT, "ping"), Response.ok(after, AGENT, "ping", {}, 1.0).payload())
        wait_for(lambda: one(db, after), 20, what="an answer sent after the refused one")
    finally:
        stop.set()
        runner.join(30)
    assert {r["id"] for r in rows(db, "SELECT id FROM requests")} == set(ids) - {poison} | {after}
    dead = rows(db, "SELECT reason, detail, payload, topic FROM rejected")
    assert [(d["reason"], d["topic"]) for d in dead] == [("store_refused", topics.response(AGENT, "ping"))]
    assert dead[0]["detail"] == f"ValueError: cannot hold the value of {poison}"
    assert json.loads(dead[0]["payload"])["id"] == poison
    assert persister.counters.rejected["store_refused"] == 1 and store.refusals <= 8  # halving, not one by one
    assert persister.counters.write_failures == 0  # split at once, not retried as if the store were down
