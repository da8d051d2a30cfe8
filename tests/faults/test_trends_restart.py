"""Trends survive a persister restarted in the middle of an hour: a real fleet-persister against a
real Mosquitto, killed with SIGKILL and stopped with SIGTERM while an hour of answers from two
simulated hosts is arriving, then started again; the stored hourly aggregates equal the hand
computation over all the answers, none lost and none counted twice."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import Procs, wait_for
from faultlib import new_prefix, start_broker, write_config
from helpers import rows
from paho.mqtt.enums import CallbackAPIVersion
from trendcalc import Sent, as_table, assert_equal, expected, generated_hour

from fleet_common import Topics, iso
from fleet_common.messages import ok_response_payload
from fleet_store import SERIES
from fleet_store.sqlite import SqliteStore

pytestmark = [pytest.mark.faults, pytest.mark.slow]


class Agents:
    """Publishes the answers of `sent`, in time order and at `rate` a second, as the agents would
    (QoS 1, each acknowledged by the broker before the next)."""

    def __init__(self, port: int, prefix: str, sent: list[Sent], rate: float) -> None:
        self.topics, self.sent, self.rate = Topics(prefix), sent, rate
        self.published = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"agents-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, name="trend-agents", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        for n, s in enumerate(self.sent):
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            payload = ok_response_payload(s.id, s.agent_id, s.type, orjson.dumps(s.data), 1.0, iso(s.collected_s))
            self.client.publish(self.topics.response(s.agent_id, s.type), payload, qos=1).wait_for_publish(10)
            self.published = n + 1

    def finish(self) -> None:
        self.thread.join(120)
        self.client.disconnect()
        self.client.loop_stop()
        assert self.published == len(self.sent)


def test_trends_survive_a_persister_killed_and_stopped_mid_hour(tmp_path: Path, procs: Procs) -> None:
    """SIGKILL and SIGTERM while an hour's answers arrive, restarts after each: the trends equal the
    hand computation over every answer (the network rates across each restart included)."""
    broker = start_broker(tmp_path)
    try:
        prefix, db = new_prefix(), tmp_path / "fleet.db"
        # parse_workers 0: messages reach the store in the order they were sent, as the hand computation takes them
        cfg = write_config(tmp_path, "persister", broker.port, prefix,
                           persister={"parse_workers": 0, "batch_wait_s": 0.3})
        procs.start_persister(cfg)
        hour = float(int(time.time()) // 3600 * 3600 - 3600)
        sent = generated_hour(hour)
        agents = Agents(broker.port, prefix, sent, rate=120)

        def stored() -> int:
            return int(rows(db, "SELECT COUNT(*) n FROM requests WHERE state = 'ok'")[0]["n"])

        for sig, at in ((signal.SIGKILL, len(sent) // 3), (signal.SIGTERM, 2 * len(sent) // 3)):
            wait_for(lambda at=at: stored() >= at, 60, 0.05, what=f"{at} answers stored")
            procs.stop("persister", sig)
            procs.start_persister(cfg)
        agents.finish()
        wait_for(lambda: stored() == len(sent), 60, what="every answer stored")
        assert "stopped: received" in procs.log("persister")  # the SIGTERM was a clean stop
        reader = SqliteStore(str(db), read_only=True)
        try:
            got = as_table([r for a in ("web-01", "db-01") for series in SERIES
                            for r in reader.trends(a, series, hour, hour + 3600)])
        finally:
            reader.close()
        assert_equal(got, expected(sent))
    finally:
        broker.stop()
