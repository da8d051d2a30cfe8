"""The persister's parse stage with real worker processes: what it passes on is what parsing
on the network thread gives, in arrival order, within its bound, and through a worker's death."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_for
from helpers import parse_workers_of, rows

import fleet_persister.persister as persister_module
from fleet_common import Request, Response, Status, Topics, iso, new_id
from fleet_common.config import PersisterConfig, load_config
from fleet_common.datatypes import example
from fleet_persister.parsing import ParseStage, Raw, pack, parse_chunk, parse_message, unpack
from fleet_persister.persister import Persister, parse_workers
from fleet_store import Batch, EncodedJSON, Incoming, RejectedRecord, open_store
from fleet_store.sqlite import SqliteStore

T = Topics("fleet")


NOW = time.time()


def mixed(n: int) -> list[Raw]:
    """Responses (of a type beyond the built-ins, so its data may be anything), requests,
    statuses and bad messages, each with its own receive time."""
    out: list[Raw] = []
    for i in range(n):
        agent, now = f"a{i % 7}", NOW + i / 1000
        kind = i % 5
        if kind == 0:
            out.append((T.request(agent, "cpu"), Request(id=new_id(), type="cpu").payload(), False, now))
        elif kind == 1:
            out.append((T.status(agent), Status(agent_id=agent, online=bool(i % 2), ts=iso(now)).payload(), True, now))
        elif kind == 2:
            out.append((T.response(agent, "cpu"), b'{"id": "broken', False, now))
        else:
            data = {"rows": [{"pid": j, "name": f"p{j}", "cpu": j / 3} for j in range(i % 13)], "n": i}
            out.append((T.response(agent, "proc_rows"),
                        Response.ok(new_id(), agent, "proc_rows", data, 1.0).payload(), False, now))
    return out


def comparable(item: Any) -> Any:
    """An item with its dead-letter id (random) blanked and any encoded data decoded."""
    if isinstance(item, RejectedRecord):
        return item.__class__(**{**item.__dict__, "id": "-"})
    msg = item.message
    if isinstance(msg, Response):
        data = json.loads(msg.data) if isinstance(msg.data, EncodedJSON) else msg.data
        return (item.agent_id, item.received_at, item.retained, {**msg.__dict__, "data": data})
    return item


def stage_run(raws: list[Raw], workers: int, encode: bool = False) -> tuple[ParseStage, list[tuple[Any, Any]]]:
    got: list[tuple[Any, Any]] = []
    stage = ParseStage(T, workers, encode, lambda item, meta: got.append((item, meta)), capacity=1000).start()
    for i, raw in enumerate(raws):
        stage.put(raw, i, timeout=10)
    wait_for(stage.idle, 60, 0.01, what="everything passed on")
    return stage, got


def test_workers_give_what_the_network_thread_gives_in_arrival_order() -> None:
    raws = mixed(1500)
    stage, got = stage_run(raws, workers=2)
    try:
        assert [meta for _, meta in got] == list(range(len(raws))), "passed on in the order put"
        here = [parse_message(T, *raw) for raw in raws]
        assert [comparable(i) for i, _ in got] == [comparable(i) for i in here]
        assert sum(isinstance(i, RejectedRecord) for i, _ in got) == 300
        assert stage.restarts == 0
    finally:
        assert stage.stop(10)


def test_encoded_data_is_stored_exactly_as_encoding_on_the_writer(tmp_path: Path) -> None:
    raws = [r for r in mixed(200) if "/res/proc_rows" in r[0]]
    plain = [parse_message(T, *raw) for raw in raws]
    encoded = [unpack(p, True, raw) for p, raw in zip(parse_chunk(T, True, raws), raws)]
    assert all(isinstance(i.message.data, EncodedJSON) for i in encoded)  # type: ignore[union-attr]
    assert [unpack(p, False, raw) for p, raw in zip(parse_chunk(T, False, raws), raws)] == plain
    a, b = SqliteStore(str(tmp_path / "a.db")), SqliteStore(str(tmp_path / "b.db"))
    try:
        a.write(Batch(responses=plain))  # type: ignore[arg-type]
        b.write(Batch(responses=encoded))  # type: ignore[arg-type]
        query = "SELECT * FROM requests ORDER BY id"
        assert a._db.execute(query).fetchall() == b._db.execute(query).fetchall()
    finally:
        a.close()
        b.close()
    for raw in mixed(20):  # each kind, bad ones too
        item = parse_message(T, *raw)
        assert comparable(unpack(pack(parse_message(T, *raw, encode=True)), True, raw)) == comparable(item)
        assert unpack(pack(item), False, raw) == item


def test_put_waits_once_capacity_messages_are_held() -> None:
    release = threading.Event()
    got: list[Any] = []

    def slow_writer(item: Any, meta: Any) -> None:
        release.wait(30)
        got.append(meta)

    stage = ParseStage(T, 1, False, slow_writer, capacity=5).start()
    try:
        raws = mixed(6)
        for i in range(5):
            stage.put(raws[i], i, timeout=1)
        assert stage.held() == 5
        with pytest.raises(queue.Full):
            stage.put(raws[5], 5, timeout=0.3)
        release.set()
        stage.put(raws[5], 5, timeout=10)
        wait_for(stage.idle, 30, 0.01, what="the held messages passed on")
        assert got == [0, 1, 2, 3, 4, 5]
    finally:
        release.set()
        stage.stop(10)


def test_a_killed_worker_loses_nothing_and_is_replaced() -> None:
    stage, got = stage_run(mixed(10), workers=1)
    try:
        wait_for(lambda: len(parse_workers_of(os.getpid())) == 1, 30, what="the worker running")
        first = parse_workers_of(os.getpid())[0]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        raws = mixed(600)
        got.clear()
        for i, raw in enumerate(raws):
            stage.put(raw, i, timeout=10)
        wait_for(stage.idle, 60, 0.01, what="everything passed on after the kill")
        assert [meta for _, meta in got] == list(range(len(raws))), "each once, in order"
        assert [comparable(i) for i, _ in got] == [comparable(parse_message(T, *raw)) for raw in raws]
        assert stage.restarts == 1
        wait_for(lambda: [p.pid for p in parse_workers_of(os.getpid())] not in ([], [first.pid]), 30,
                 what="a new worker")
    finally:
        assert stage.stop(10)
    wait_for(lambda: not parse_workers_of(os.getpid()), 15, what="the workers gone after stop")


def test_a_worker_leaves_when_its_persister_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the persister no chance to end its workers; they notice and leave."""
    script = tmp_path / "host.py"
    script.write_text("from fleet_common import Topics\n"
                      "from fleet_persister.parsing import ParseStage\n"
                      "if __name__ == '__main__':\n"
                      "    s = ParseStage(Topics('fleet'), 1, False, lambda i, m: None, 10).start()\n"
                      "    import time; time.sleep(120)\n")
    proc = psutil.Popen([sys.executable, str(script)])
    try:
        wait_for(lambda: len(parse_workers_of(proc.pid)) == 1, 30, what="the worker started")
        worker = parse_workers_of(proc.pid)[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        worker.wait(15)  # raises if it is still running
    finally:
        if proc.is_running():
            proc.kill()


def test_parse_workers_default_to_one_per_core_beyond_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, expected in ((1, 0), (2, 1), (4, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert parse_workers(PersisterConfig()) == expected
    assert parse_workers(PersisterConfig(parse_workers=0)) == 0
    assert parse_workers(PersisterConfig(parse_workers=3)) == 3


def test_incoming_received_at_is_when_the_network_thread_took_it() -> None:
    raw = mixed(4)[3]
    item = unpack(parse_chunk(T, True, [raw])[0], True, raw)
    assert isinstance(item, Incoming) and item.received_at == iso(raw[3])
    time.sleep(0.01)
    assert parse_message(T, *raw).received_at == iso(raw[3])


def test_without_worker_processes_the_persister_parses_on_its_network_thread(
        broker: Any, write_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where worker processes cannot start (no /dev/shm in a container, say), the persister says
    so once and stores everything itself."""
    def no_workers(*args: Any, **kwargs: Any) -> None:
        raise OSError("no /dev/shm here")

    monkeypatch.setattr(persister_module, "ParseStage", no_workers)
    caplog.set_level(logging.INFO, logger="fleet")
    cfg = load_config(str(write_config(persister={"parse_workers": 2})))
    persister = Persister(cfg, open_store(cfg.persister))
    stop = threading.Event()
    runner = threading.Thread(target=persister.run, args=(stop,))
    runner.start()
    try:
        assert persister.ready.wait(20), "the persister's subscriptions were not acknowledged"
        topics = cfg.mqtt.topics()
        reply = Response.ok(new_id(), "web-01", "cpu", example("cpu", percent=3.0), 1.0)
        persister.link.publish(topics.response("web-01", "cpu"), reply.payload()).wait_for_publish(10)
        db = Path(cfg.persister.sqlite_path)
        wait_for(lambda: rows(db, "SELECT id FROM requests WHERE state = 'ok'"), 20, what="the answer stored")
    finally:
        stop.set()
        runner.join(30)
    assert persister.workers == 0 and persister.stage is None
    assert "cannot start parse worker processes (OSError: no /dev/shm here); parsing on the network thread" \
        in caplog.text
