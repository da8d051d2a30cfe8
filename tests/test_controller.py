"""A real `fleet-controller` process against a real Mosquitto, with fake agents made of paho clients."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import BIN, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common.messages import Status, parse_request
from fleet_common.timefmt import parse_iso
from fleet_common.topics import Topics

pytestmark = pytest.mark.slow

SCHEDULE = {"cpu": 1, "ping": 2}


class FakeFleet:
    """One MQTT 5 client that publishes agents' statuses and records every request sent to them."""

    def __init__(self, port: int, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.requests: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-fake", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topics.all_requests(), qos=1)
        assert self._subscribed.wait(10), "the fake fleet could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.requests.append(msg)

    def birth(self, agent_id: str, types: list[str]) -> None:
        status = Status(agent_id=agent_id, online=True, hostname=agent_id, types=types)
        self.client.publish(self.topics.status(agent_id), status.payload(), qos=1, retain=True).wait_for_publish(10)

    def asked(self, agent_id: str, type_: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.requests if m.topic == self.topics.request(agent_id, type_)]

    def pairs(self) -> dict[tuple[str, str], int]:
        with self._lock:
            topics = [self.topics.parse(m.topic) for m in self.requests]
        counts: dict[tuple[str, str], int] = {}
        for t in topics:
            assert t.type is not None
            counts[(t.agent_id, t.type)] = counts.get((t.agent_id, t.type), 0) + 1
        return counts

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fake_fleet(broker: Any, prefix: str) -> Iterator[FakeFleet]:
    f = FakeFleet(broker.port, prefix)
    yield f
    f.close()


def test_requests_carry_payload_and_mqtt5_properties(fake_fleet: FakeFleet, write_config: Any, procs: Any) -> None:
    """Agents from retained status are asked for their advertised scheduled types, with the
    request payload and MQTT 5 ResponseTopic, CorrelationData and MessageExpiryInterval."""
    fake_fleet.birth("web-01", ["cpu", "ping", "disk"])
    fake_fleet.birth("db-01", ["cpu", "memory"])
    config = write_config(controller={"schedule": SCHEDULE, "tick_s": 0.2})
    procs.start("controller", "fleet-controller", "--config", str(config))

    wait_for(lambda: len(fake_fleet.asked("web-01", "ping")) >= 2 and len(fake_fleet.asked("db-01", "cpu")) >= 2,
             what="two rounds of requests for both agents")
    assert set(fake_fleet.pairs()) == {("web-01", "cpu"), ("web-01", "ping"), ("db-01", "cpu")}
    for agent_id, type_ in fake_fleet.pairs():
        for msg in fake_fleet.asked(agent_id, type_):
            request = parse_request(bytes(msg.payload), fake_fleet.topics.parse(msg.topic))
            props: Any = msg.properties
            assert request.type == type_ and request.params == {} and request.v == 1
            assert request.issued_at is not None and request.expires_at is not None
            interval = SCHEDULE[type_]
            assert parse_iso(request.expires_at) - parse_iso(request.issued_at) == pytest.approx(interval)
            assert msg.qos == 1 and not msg.retain
            assert props.ResponseTopic == fake_fleet.topics.response(agent_id, type_)
            assert props.CorrelationData == request.id.encode()
            # the broker may have counted a second down while the message was in flight
            assert interval - 1 <= props.MessageExpiryInterval <= interval

    assert procs.stop("controller") == 0


def test_live_birth_of_new_agent_gets_an_immediate_round(fake_fleet: FakeFleet, write_config: Any,
                                                          procs: Any) -> None:
    """A live birth from an unseen agent is asked for all its types at once; an agent known
    from retained status at start-up is not (no burst after a restart)."""
    fake_fleet.birth("old-01", ["cpu", "ping"])
    config = write_config(controller={"schedule": {"cpu": 3600, "ping": 3600}})
    procs.start_controller(config)

    fake_fleet.birth("new-01", ["cpu", "ping", "disk"])
    wait_for(lambda: fake_fleet.asked("new-01", "cpu") and fake_fleet.asked("new-01", "ping"),
             what="the first round for new-01")
    # One connection publishes in order, so a burst for old-01 would have arrived first.
    assert not fake_fleet.asked("old-01", "cpu") and not fake_fleet.asked("old-01", "ping")
    assert not fake_fleet.asked("new-01", "disk")
    assert procs.stop("controller") == 0


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """A configuration error is one line on stderr naming the key, and exit code 2."""
    config = tmp_path / "bad.yaml"
    config.write_text("controller:\n  shard: '3/2'\n")
    done = subprocess.run([str(BIN / "fleet-controller"), "--config", str(config)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "controller.shard" in done.stderr


def test_sigterm_while_disconnected_exits_0(tmp_path: Path) -> None:
    """SIGTERM stops the controller cleanly even when no broker answers."""
    config = tmp_path / "alone.yaml"
    config.write_text("mqtt:\n  host: 127.0.0.1\n  port: 9\ncontroller:\n  tick_s: 0.1\n")
    proc = subprocess.Popen([str(BIN / "fleet-controller"), "--config", str(config)], stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "controller started" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_a_broker_that_stops_acknowledging_gets_no_more_requests(fake_fleet: FakeFleet, broker: Any,
                                                                 write_config: Any, procs: Any) -> None:
    """The broker frozen (SIGSTOP): once its window (here max_unacked_requests) is unacknowledged
    the controller sends nothing more, saying so once, rather than queueing requests without end;
    thawed, it catches up and goes on."""
    agents = [f"web-{i:03d}" for i in range(100)]
    for agent_id in agents:
        fake_fleet.birth(agent_id, ["cpu"])
    config = write_config(controller={"schedule": {"cpu": 1}, "tick_s": 0.1, "max_unacked_requests": 150},
                          log={"level": "info"})
    procs.start("controller", "fleet-controller", "--config", str(config))
    wait_for(lambda: len(fake_fleet.requests) >= 200, what="requests flowing")
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: "has not acknowledged 150 requests" in procs.log("controller"), timeout_s=10,
                 what="the controller to notice")
        time.sleep(3.0)  # each agent falls due three times more meanwhile (it waits once: test_pacing)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "the broker caught up" in procs.log("controller"), what="dispatching again")
    log = procs.log("controller")
    assert log.count("has not acknowledged") == 1, "said once, not per request"
    seen = len(fake_fleet.requests)
    wait_for(lambda: len(fake_fleet.requests) >= seen + 200, what="requests flowing again")
    assert procs.stop("controller") == 0
