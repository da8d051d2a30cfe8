"""Nothing lost, nothing doubled: each numbered case of the reliability issue with real
processes and real signals, under a background load of 200 request + response pairs per
second. Every test counts what was produced against what was stored and asserts equality.
Outages of 60 s in the issue are shortened here to a few seconds; the property is the same.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Procs, wait_for
from faultlib import (
    Load,
    Proxy,
    Requester,
    answered_in_log,
    assert_exactly_stored,
    new_prefix,
    start_broker,
    stored_answered,
    wait_persister_ready,
    write_config,
)
from helpers import parse_workers_of, rows

from fleet_controller.schedule import SLOT_MS, phase_ms
from fleetctl.broker import EmbeddedBroker

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def fbroker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def loads(tmp_path: Path) -> Iterator[list[Load]]:
    started: list[Load] = []
    yield started
    for load in started:
        load.kill()


def run_for(seconds: float) -> None:
    time.sleep(seconds)  # the load runs meanwhile; nothing is asserted about speed


def test_1_persister_sigkill_mid_batch_loses_and_doubles_nothing(tmp_path: Path, fbroker: EmbeddedBroker,
                                                                 procs: Procs, loads: list[Load]) -> None:
    """A persister killed with SIGKILL under load gets everything it had not committed redelivered."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    # batches of up to 0.5 s: a kill at any moment finds ~200 received, uncommitted messages
    cfg = write_config(tmp_path, "persister", fbroker.port, prefix, persister={"batch_wait_s": 0.5})
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, fbroker.port, prefix))
    wait_for(lambda: len(stored_pairs_now(db)) > 300, 30, what="the load being stored")
    for _ in range(4):
        procs.stop("persister", signal.SIGKILL)
        run_for(1)  # the broker queues for the dead persister's session meanwhile
        procs.start("persister", "fleet-persister", "--config", str(cfg))
        wait_persister_ready(procs, "persister")
        run_for(1.5)
    produced = loads[0].finish()
    assert len(produced) > 1000
    assert_exactly_stored(db, produced)


def test_1b_persister_sigkill_with_a_received_uncommitted_batch_loses_nothing(
        tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs, loads: list[Load]) -> None:
    """Deterministic case 1: with the SQLite file locked, the persister has received a batch it cannot
    commit; SIGKILLed then, it had acknowledged none of it, so the broker redelivers it all to the
    restarted persister and every produced pair is stored exactly once."""
    db, cfg, locker = lock_store_under_load(tmp_path, fbroker, procs, loads)
    try:
        wait_for(lambda: "store write failed" in procs.log("persister"), 20, 0.05,
                 what="the persister holding a batch it cannot commit")
        procs.stop("persister", signal.SIGKILL)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # received (logged as queued) after the last commit: held, unacknowledged, when it died
    held = procs.log("persister").rsplit("committed a batch", 1)[1].count("queued message")
    assert held > 100, f"only {held} messages were received and uncommitted at the kill"
    procs.start("persister2", "fleet-persister", "--config", str(cfg))
    run_for(2)
    assert_exactly_stored(db, loads[0].finish())


def test_1c_parse_worker_sigkill_loses_and_doubles_nothing(tmp_path: Path, fbroker: EmbeddedBroker,
                                                           procs: Procs, loads: list[Load]) -> None:
    """A parse worker killed with SIGKILL under load: the persister parses the chunks it held
    itself, starts a new worker, and every produced pair is stored exactly once."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    cfg = write_config(tmp_path, "persister", fbroker.port, prefix, persister={"parse_workers": 1})
    proc = procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, fbroker.port, prefix))
    wait_for(lambda: len(stored_pairs_now(db)) > 300, 30, what="the load being stored")
    killed = []
    for _ in range(3):
        workers = wait_for(lambda: [w for w in parse_workers_of(proc.pid) if w.pid not in killed], 30,
                           what="a parse worker running")
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        killed.append(workers[0].pid)
        run_for(1.5)
    produced = loads[0].finish()
    assert len(produced) > 1000
    assert_exactly_stored(db, produced)
    assert procs.log("persister").count("a parse worker stopped unexpectedly") == 3
    assert proc.poll() is None


def stored_pairs_now(db: Path) -> list[dict]:
    return rows(db, "SELECT id FROM requests WHERE state = 'ok' AND id LIKE 'ld%'")


def test_2_broker_sigkill_restart_from_persistence(tmp_path: Path, procs: Procs, loads: list[Load]) -> None:
    """Mosquitto killed with SIGKILL and restarted from its persistence file, saving on every change:
    every produced pair is stored once, and agent, controller and persister reconnect by themselves."""
    broker = start_broker(tmp_path)  # the shipped dev.conf: saves on every change
    try:
        prefix, db = new_prefix(), tmp_path / "fleet.db"
        # Mosquitto 2.0 does not restore shared subscriptions from its persistence file, so a
        # broker crash loses what is published before the persister resubscribes; one
        # persister therefore subscribes plainly (docs/reliability.md).
        cfg = write_config(tmp_path, "stack", broker.port, prefix, controller={"schedule": {"ping": 1}},
                           persister={"shared_subscription": False})
        procs.start("persister", "fleet-persister", "--config", str(cfg))
        wait_persister_ready(procs, "persister")
        procs.start("controller", "fleet-controller", "--config", str(cfg))
        agent_cfg = write_config(tmp_path, "agent", broker.port, prefix, agent={"id": "host-a"})
        procs.start("agent", "fleet-agent", "--config", str(agent_cfg))
        loads.append(Load(tmp_path, broker.port, prefix))
        wait_for(lambda: len(stored_pairs_now(db)) > 300 and stored_answered(db, "%") - stored_load(db),
                 30, what="the load and the agent's answers being stored")
        broker.kill()
        killed = time.time()
        run_for(2)
        broker.start()
        restarted = time.time()
        run_for(3)
        produced = loads[0].finish()
        assert_exactly_stored(db, produced)
        wait_for(lambda: rows(db, "SELECT id FROM requests WHERE agent_id = 'host-a' AND state = 'ok' "
                                  "AND answered_at > ?", iso_(restarted)),
                 30, what="the agent answering the controller's requests after the restart")
        for name in ("persister", "controller", "agent"):
            assert procs.procs[name].poll() is None, f"{name} stopped"
            assert procs.log(name).count("connected to broker") >= 2, f"{name} did not reconnect"
        assert killed < restarted
    finally:
        broker.stop()


def lock_store_under_load(tmp_path: Path, broker: EmbeddedBroker, procs: Procs,
                          loads: list[Load]) -> tuple[Path, Path, sqlite3.Connection]:
    """A persister storing the background load, then its SQLite file locked by another writer."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    cfg = write_config(tmp_path, "persister", broker.port, prefix)
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, broker.port, prefix))
    wait_for(lambda: len(stored_pairs_now(db)) > 300, 30, what="the load being stored")
    locker = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    return db, cfg, locker


def iso_(t: float) -> str:
    from fleet_common import iso
    return iso(t)


def stored_load(db: Path) -> set:
    return stored_answered(db, "ld%")


def test_5_store_locked_persister_stops_acknowledging_and_loses_nothing(
        tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs, loads: list[Load]) -> None:
    """With the SQLite file locked by another writer for 8 s, the persister acknowledges nothing,
    the broker queues, and everything is stored once the lock goes."""
    db, _, locker = lock_store_under_load(tmp_path, fbroker, procs, loads)
    locked_at = len(stored_pairs_now(db))
    run_for(8)
    assert len(stored_pairs_now(db)) == locked_at, "something was written while the store was locked"
    locker.execute("ROLLBACK")
    locker.close()
    run_for(2)
    produced = loads[0].finish()
    assert_exactly_stored(db, produced)
    assert "store write failed" in procs.log("persister")
    assert procs.procs["persister"].poll() is None
    # a locked store is no fault of the data: nothing was taken for a message the store refuses
    assert rows(db, "SELECT reason FROM rejected") == []


MONGODB_URI = os.environ.get("FLEET_TEST_MONGODB_URI")


def test_5_mongodb_unreachable_through_proxy_loses_nothing(tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs,
                                                          loads: list[Load]) -> None:
    """With the persister's link to MongoDB cut for 8 s (TCP proxy) under load, it acknowledges
    nothing, the broker queues, and once the link is back every produced pair is stored once."""
    if not MONGODB_URI:
        pytest.skip("no MongoDB server: set FLEET_TEST_MONGODB_URI (e.g. mongodb://localhost:27017) to run this")
    from pymongo import MongoClient, uri_parser

    host, port = uri_parser.parse_uri(MONGODB_URI)["nodelist"][0]
    prefix = new_prefix()
    database = f"fleettest_{prefix}"
    proxy = Proxy(port, host)
    direct: MongoClient = MongoClient(MONGODB_URI, serverSelectionTimeoutMS=5000)
    requests = direct[database]["requests"]

    def pairs() -> set:
        return {d["_id"] for d in requests.find({"_id": {"$regex": "^ld"}, "state": "ok",
                                                 "issued_at": {"$ne": None}}, {"_id": 1})}

    try:
        # directConnection: a replica-set member must not send the client around the proxy
        uri = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        cfg = write_config(tmp_path, "persister", fbroker.port, prefix,
                           persister={"store": "mongodb", "mongodb_uri": uri, "mongodb_database": database})
        procs.start("persister", "fleet-persister", "--config", str(cfg))
        wait_persister_ready(procs, "persister")
        loads.append(Load(tmp_path, fbroker.port, prefix))
        wait_for(lambda: len(pairs()) > 300, 30, what="the load being stored in MongoDB")
        proxy.set_mode("refuse")
        run_for(8)
        proxy.set_mode("pass")
        run_for(2)
        produced = loads[0].finish()
        wait_for(lambda: pairs() >= produced, 90, 0.5, what="every produced pair stored in MongoDB")
        assert pairs() == produced
        assert requests.count_documents({"_id": {"$regex": "^ld"}}) == len(produced)
        assert direct[database]["rejected"].count_documents({}) == 0
        assert "store write failed" in procs.log("persister")
        assert procs.procs["persister"].poll() is None
    finally:
        proxy.close()
        direct.drop_database(database)
        direct.close()


def test_7_duplicates_two_persisters_and_redelivery_leave_one_record(
        tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs, loads: list[Load]) -> None:
    """Every message published twice, two persisters on the shared subscription, one of them
    killed with SIGKILL (QoS 1 redelivery): one record per produced pair."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    shared = {"shared_subscription": True, "share_group": f"group-{prefix}-0123456789"}
    for name in ("p1", "p2"):
        cfg = write_config(tmp_path, name, fbroker.port, prefix, persister={"client_id": f"persister-{name}", **shared})
        procs.start(name, "fleet-persister", "--config", str(cfg))
        wait_persister_ready(procs, name)
    loads.append(Load(tmp_path, fbroker.port, prefix, twice=True))
    wait_for(lambda: len(stored_pairs_now(db)) > 300, 30, what="the load being stored")
    procs.stop("p1", signal.SIGKILL)
    run_for(1)
    procs.start("p1", "fleet-persister", "--config", str(tmp_path / "p1.yaml"))
    run_for(2)
    produced = loads[0].finish()
    assert_exactly_stored(db, produced)
    for name in ("p1", "p2"):
        assert "committed a batch" in procs.log(name), f"{name} stored nothing: the share was not split"


def outbox_count(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def start_agent_behind_proxy(tmp_path: Path, procs: Procs, broker: EmbeddedBroker, prefix: str,
                             db: Path) -> tuple:
    proxy = Proxy(broker.port)
    cfg = write_config(tmp_path, "agent", proxy.port, prefix, agent={"id": "host-c"})
    procs.start("agent", "fleet-agent", "--config", str(cfg))
    # the birth status follows the agent's SUBSCRIBE: from then on no request is missed
    wait_for(lambda: rows(db, "SELECT online FROM agents WHERE agent_id = 'host-c' AND online = 1"), 30,
             what="the agent's birth status")
    requester = Requester(broker.port, prefix, "host-c")
    wait_for(lambda: len(stored_answered(db, "rq%")) > 20, 30, what="the agent's answers being stored")
    return proxy, cfg, requester


def test_3_agent_link_cut_answers_wait_in_outbox(tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs,
                                                 loads: list[Load]) -> None:
    """The agent's answers are lost on the wire for 5 s, then its link is down for 3 s: what it
    answered meanwhile waits in its outbox and is stored once the link returns."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    procs.start("persister", "fleet-persister", "--config", str(write_config(tmp_path, "p", fbroker.port, prefix)))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, fbroker.port, prefix))
    proxy, _, requester = start_agent_behind_proxy(tmp_path, procs, fbroker, prefix, db)
    outbox = tmp_path / "agent-outbox.db"
    proxy.set_mode("drop_publish")
    peak, until = 0, time.monotonic() + 5
    while time.monotonic() < until:
        peak = max(peak, outbox_count(outbox))
        time.sleep(0.2)
    proxy.set_mode("refuse")
    run_for(3)
    peak = max(peak, outbox_count(outbox))
    proxy.set_mode("pass")
    run_for(2)
    sent = requester.stop()
    wait_for(lambda: stored_answered(db, "rq%") >= sent, 60, what="every request to the agent answered and stored")
    assert stored_answered(db, "rq%") == sent
    assert proxy.dropped > 20 and peak > 20, (proxy.dropped, peak)
    wait_for(lambda: outbox_count(outbox) == 0, 30, what="the outbox emptied by PUBACKs")
    assert_exactly_stored(db, loads[0].finish())
    proxy.close()


def test_4_agent_sigkill_answers_survive_in_outbox(tmp_path: Path, fbroker: EmbeddedBroker, procs: Procs,
                                                   loads: list[Load]) -> None:
    """Answers the agent produced but the broker never acknowledged survive SIGKILL in the
    outbox and are stored after the restart."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    procs.start("persister", "fleet-persister", "--config", str(write_config(tmp_path, "p", fbroker.port, prefix)))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, fbroker.port, prefix))
    proxy, cfg, requester = start_agent_behind_proxy(tmp_path, procs, fbroker, prefix, db)
    proxy.set_mode("drop_publish")  # requests still arrive and are acknowledged; answers vanish
    wait_for(lambda: proxy.dropped > 40, 30, what="answers lost on the wire")
    procs.stop("agent", signal.SIGKILL)
    waiting = outbox_count(tmp_path / "agent-outbox.db")
    proxy.set_mode("pass")
    procs.start("agent2", "fleet-agent", "--config", str(cfg))
    run_for(2)
    sent = requester.stop()
    produced = answered_in_log(procs.log("agent") + procs.log("agent2"))
    wait_for(lambda: stored_answered(db, "rq%") >= produced, 60, what="every produced answer stored")
    stored = stored_answered(db, "rq%")
    assert stored <= sent
    # an answer committed to the outbox in the instant before SIGKILL is not yet in the log
    assert len(stored - produced) <= 2, sorted(stored - produced)
    assert waiting > 20, f"only {waiting} answers were waiting in the outbox at the kill"
    assert_exactly_stored(db, loads[0].finish())
    proxy.close()


def test_6_controller_restart_keeps_phases_without_burst(tmp_path: Path, fbroker: EmbeddedBroker,
                                                         procs: Procs, loads: list[Load]) -> None:
    """A controller killed and restarted asks each agent at the same per-type phase as before,
    and never twice in one interval: no catch-up burst."""
    prefix, db = new_prefix(), tmp_path / "fleet.db"
    schedule = {"ping": 2, "cpu": 3}
    cfg = write_config(tmp_path, "stack", fbroker.port, prefix, controller={"schedule": schedule})
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_persister_ready(procs, "persister")
    loads.append(Load(tmp_path, fbroker.port, prefix))
    agent_cfg = write_config(tmp_path, "agent", fbroker.port, prefix, agent={"id": "host-s"})
    procs.start("agent", "fleet-agent", "--config", str(agent_cfg))
    wait_for(lambda: rows(db, "SELECT online FROM agents WHERE agent_id = 'host-s' AND online = 1"), 30,
             what="the agent's retained birth status")
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    run_for(7)
    procs.stop("controller", signal.SIGKILL)
    restarted = time.time()
    procs.start("controller2", "fleet-controller", "--config", str(cfg))
    run_for(8)
    procs.stop("controller2")
    for type_, interval in schedule.items():
        # The controller dispatches a 100 ms slot at a time: a request may go out when its phase's
        # slot begins, up to one slot before the phase itself.
        phase = phase_ms("host-s", type_, interval) // SLOT_MS * SLOT_MS / 1000
        issued = sorted(parse(r["issued_at"]) for r in rows(
            db, "SELECT issued_at FROM requests WHERE agent_id = 'host-s' AND type = ?", type_))
        assert any(t < restarted for t in issued) and any(t > restarted for t in issued), (type_, issued)
        slots = [int((t - phase) // interval) for t in issued]
        late = [(t - phase) % interval for t in issued]
        assert len(slots) == len(set(slots)), f"{type_}: two requests in one interval: {issued}"
        assert all(x < 1.5 for x in late), f"{type_}: requests off their phase by {late}"
    assert_exactly_stored(db, loads[0].finish())


def parse(ts: str) -> float:
    from fleet_common import parse_iso
    return parse_iso(ts)


def _broker_restart_then_publish(tmp_path: Path, topic_filter: str) -> list[bytes]:
    """Subscribe with a persistent session, SIGKILL and restart the broker, publish before the
    subscriber comes back, and return what the returning subscriber receives."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    tmp_path.mkdir(parents=True, exist_ok=True)
    broker = start_broker(tmp_path)
    got: list[bytes] = []
    subscribed = []

    def subscriber() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sub-" + tmp_path.name[-20:], protocol=mqtt.MQTTv5)
        c.on_message = lambda client, userdata, msg: got.append(bytes(msg.payload))
        c.on_subscribe = lambda *a: subscribed.append(1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        c.loop_start()
        return c

    def publish(tag: str) -> None:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for i in range(5):
            pub.publish("x/1", f"{tag}{i}".encode(), qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()

    try:
        sub = subscriber()
        sub.subscribe(topic_filter, qos=1)
        wait_for(lambda: subscribed, 10, what="the subscription")
        publish("before")
        wait_for(lambda: len(got) == 5, 10, what="the messages before the crash")
        sub.loop_stop()
        broker.kill()
        broker.start()
        publish("after")
        got.clear()
        sub = subscriber()
        run_for(1.5)
        sub.loop_stop()
        return got
    finally:
        broker.stop()


def test_mosquitto_restores_plain_but_not_shared_subscriptions_after_a_crash(tmp_path: Path) -> None:
    """Why a lone persister may subscribe plainly (persister.shared_subscription: false): after a
    broker crash, Mosquitto 2.0 keeps a persistent session's plain subscription, so what is
    published before the subscriber returns is queued for it, but drops its shared subscription,
    so the same messages are lost. If a Mosquitto release fixes this, this test says so."""
    plain = _broker_restart_then_publish(tmp_path / "plain", "x/#")
    shared = _broker_restart_then_publish(tmp_path / "shared", "$share/g/x/#")
    assert plain == [f"after{i}".encode() for i in range(5)]
    assert shared == [], "Mosquitto now restores shared subscriptions: the caveat in docs/reliability.md can go"
