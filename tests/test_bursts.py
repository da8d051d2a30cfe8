"""Bursts against a broker with Mosquitto's default limits (20 messages in flight, 1000 queued per
client), as a Debian host's stock mosquitto.conf has: a fleet coming online at once is paced by
the controller's dispatch budget and loses nothing; drops made on purpose are seen, logged,
exported and shown by `fleetctl status`; a broker without a $SYS tree is said once; and
`fleetctl up` says when the broker it found keeps the defaults."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import BIN, Procs, config_file, wait_for
from helpers import rows
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import Response, Topics, new_id
from fleet_common.datatypes import example
from fleetctl.broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.slow

TYPES = ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")
DROPS = "Outgoing messages are being dropped"


# What Debian's mosquitto package configures (its /etc/mosquitto/mosquitto.conf, listener and
# persistence aside, are Mosquitto's defaults: 20 messages in flight and 1000 queued per client,
# persistence saved every 30 min, Nagle's algorithm on), and $SYS every second, not every 10.
STOCK = """listener 1883 127.0.0.1
allow_anonymous true
persistence true
persistence_location data/
sys_interval 1
log_dest stderr
log_type error
log_type warning
log_type notice
"""


def stock_conf(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "stock.conf"
    path.write_text(STOCK + extra)
    return path


@pytest.fixture
def stock(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    log = open(tmp_path / "mosquitto.log", "wb")
    broker = EmbeddedBroker(stock_conf(tmp_path), free_port(), tmp_path / "broker", log=log).start()
    yield broker
    broker.stop()
    log.close()


def test_two_thousand_agents_coming_online_at_once_lose_nothing_on_a_stock_broker(
        tmp_path: Path, procs: Procs, stock: EmbeddedBroker) -> None:
    """2,000 simulated agents start together in front of a running controller and persister, and
    later stop together: the first round of 14,000 requests is paced (controller.max_dispatch_per_s,
    and never more unacknowledged than the broker's window), every request is answered and stored
    (none expired), every goodbye is stored, and the broker drops nothing."""
    prefix = "burst" + new_id()[-6:]
    cfg = config_file(tmp_path, "burst", stock.port, prefix, log={"level": "info"},
                      controller={"heartbeat_path": str(tmp_path / "controller.heartbeat.json")})
    db = tmp_path / "fleet.db"
    procs.start_persister(cfg)
    procs.start_controller(cfg)
    started = time.monotonic()
    procs.start("sim", "fleet-sim", "--config", str(cfg), "--agents", "2000", "--id-prefix", "b")

    def answered_pairs() -> int:
        return int(rows(db, "SELECT COUNT(DISTINCT agent_id || '/' || type) AS n FROM requests "
                            "WHERE state = 'ok'")[0]["n"] if db.exists() else 0)

    wait_for(lambda: answered_pairs() == 2000 * len(TYPES), 240, 1.0, what="all seven answers of 2,000 agents")
    took = time.monotonic() - started
    # The controller stops first: a request it sent between the agents stopping and their goodbyes
    # reaching it would rightly wait for them at the broker, and is no burst loss.
    procs.stop("controller")
    wait_for(lambda: not rows(db, "SELECT 1 FROM requests WHERE state = 'pending' LIMIT 1"), 60, 0.5,
             what="every request issued answered")
    procs.stop("sim")  # and all 2,000 say goodbye at once: another burst, of statuses
    wait_for(lambda: rows(db, "SELECT COUNT(*) AS n FROM agents WHERE online = 0")[0]["n"] == 2000, 60, 0.5,
             what="every agent's goodbye stored")
    states = {r["state"]: r["n"] for r in rows(db, "SELECT state, COUNT(*) AS n FROM requests GROUP BY state")}
    print(f"2,000 agents: every first answer stored {took:.1f} s after they started; states {states}")
    assert set(states) == {"ok"}, states
    assert DROPS not in (tmp_path / "mosquitto.log").read_text(errors="replace")
    assert rows(db, "SELECT COUNT(*) AS n FROM rejected")[0]["n"] == 0


def publish_answers(port: int, topics: Topics, n: int) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{new_id()[-8:]}", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for _ in range(n):
            body = Response.ok(new_id(), "host-d", "ping", example("ping"), 0.1).payload()
            c.publish(topics.response("host-d", "ping"), body, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def broker_dropped(port: int, at_least: int, timeout_s: float = 20) -> int:
    """The broker's own $SYS drop count, once it says at least `at_least`. It publishes the count
    every sys_interval and keeps the last one retained, so a client that subscribes just after a
    burst can be handed the count from the middle of it."""
    seen: list[int] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sys-{new_id()[-8:]}", protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, ud, msg: seen.append(int(msg.payload))
    c.on_connect = lambda cl, *a: cl.subscribe("$SYS/broker/publish/messages/dropped")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        return int(wait_for(lambda: seen and seen[-1] >= at_least and seen[-1], timeout_s, 0.1,
                            what=f"the broker's $SYS count of at least {at_least} dropped messages"))
    finally:
        c.disconnect()
        c.loop_stop()


def test_broker_drops_are_logged_exported_and_shown_by_fleetctl_status(tmp_path: Path, procs: Procs) -> None:
    """A stopped persister's session holding at most 10 messages, 200 answers published meanwhile:
    the broker drops most, and the persister, started again, says so in one warning line, in its
    heartbeat file and its metrics, and `fleetctl status` prints a warning line about it."""
    log = open(tmp_path / "mosquitto.log", "wb")
    broker = EmbeddedBroker(stock_conf(tmp_path, "max_queued_messages 10\n"), free_port(), tmp_path / "broker",
                            log=log).start()
    try:
        prefix = "drop" + new_id()[-6:]
        metrics_port = free_port()
        heartbeat = tmp_path / "persister.heartbeat.json"
        cfg = config_file(tmp_path, "drops", broker.port, prefix, log={"level": "info"},
                          persister={"metrics_enabled": True, "metrics_port": metrics_port,
                                     "heartbeat_path": str(heartbeat), "heartbeat_interval_s": 0.2})
        procs.start_persister(cfg)  # its session will queue for it while it is stopped
        assert procs.stop("persister") == 0
        publish_answers(broker.port, Topics(prefix), 200)
        # the persister warns about the count it is first given; let the broker's retained one settle
        settled = broker_dropped(broker.port, 150)
        procs.start_persister(cfg, name="persister-again")
        wait_for(lambda: "the broker has dropped" in procs.log("persister-again"), 20,
                 what="the persister's warning about drops")
        line = next(ln for ln in procs.log("persister-again").splitlines() if "the broker has dropped" in ln)
        dropped = int(re.search(r"dropped (\d+) messages", line).group(1))  # type: ignore[union-attr]
        assert dropped >= settled >= 150 and "max_queued_messages" in line
        beat: dict[str, Any] = wait_for(lambda: (b := json.loads(heartbeat.read_text())) and
                                        b["counters"]["broker"]["dropped"] and b, 10, what="drops in the heartbeat")
        assert beat["counters"]["broker"]["dropped"] == dropped and beat["counters"]["broker"]["sys"] is True
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(rf"(?m)^fleet_broker_messages_dropped {dropped}(\.0)?$", metrics), metrics[-2000:]
        status = subprocess.run([str(BIN / "fleetctl"), "--config", str(cfg), "status"], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"warning: the broker has dropped {dropped} messages" in status.stderr
        assert procs.log("persister-again").count("the broker has dropped") == 1, "once a minute, not per update"
    finally:
        broker.stop()
        log.close()


def test_a_broker_without_a_sys_tree_is_said_once(tmp_path: Path, procs: Procs) -> None:
    """sys_interval 0: the persister says once that it cannot see drops, and stores as usual."""
    log = open(tmp_path / "mosquitto.log", "wb")
    broker = EmbeddedBroker(stock_conf(tmp_path, "sys_interval 0\n"), free_port(), tmp_path / "broker",
                            log=log).start()
    try:
        cfg = config_file(tmp_path, "nosys", broker.port, "nosys" + new_id()[-6:], log={"level": "info"})
        procs.start_persister(cfg)
        wait_for(lambda: "publishes no $SYS tree" in procs.log("persister"), 20, what="the persister to say so")
        assert procs.log("persister").count("publishes no $SYS tree") == 1
    finally:
        broker.stop()
        log.close()


def test_fleetctl_up_warns_when_the_broker_it_finds_keeps_the_stock_limits(tmp_path: Path,
                                                                          stock: EmbeddedBroker) -> None:
    """`fleetctl up` in front of a broker with Mosquitto's default limits says so in one line, and
    how to get dev.conf's limits; the stack runs anyway."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "mqtt": {"port": stock.port, "topic_prefix": "upstock"},
        "agent": {"id": "up-host", "outbox_path": str(tmp_path / "outbox.db")},
        "persister": {"sqlite_path": str(tmp_path / "fleet.db")}}))
    out = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([str(BIN / "fleetctl"), "--config", str(cfg), "up", "--data-dir", str(tmp_path / "data")],
                            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: "stack is up" in (tmp_path / "up.log").read_text(), 30, what="the stack to start")
        text = (tmp_path / "up.log").read_text()
        warning = [ln for ln in text.splitlines() if "warning: the broker at" in ln]
        assert len(warning) == 1 and "20 unacknowledged messages" in warning[0]
        assert "max_queued_messages 100000" in warning[0] and "broker_config/dev.conf" in warning[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        print((tmp_path / "up.log").read_text()[-3000:], file=sys.stderr)
