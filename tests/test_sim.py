"""The fleet simulator: contract-valid synthetic answers, and real simulated agents that the
real persister and controller (unchanged) serve; two controller shards split the fleet."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from conftest import Procs, wait_for
from fleet_sim.synthetic import TYPES, BadParams, Host
from helpers import rows
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import ParsedTopic, now_iso, parse_iso, parse_response
from fleet_common.datatypes import BUILTIN as DATATYPES
from fleet_controller.schedule import SLOT_MS, phase_ms
from fleet_persister.datacheck import check_data
from fleetctl.broker import EmbeddedBroker


def envelope(host: Host, type_: str, params: dict[str, Any]) -> bytes:
    data = host.reading(type_, params)
    return (b'{"v":1,"id":"r1","agent_id":"web-01","type":"' + type_.encode() + b'","status":"ok","data":' + data
            + b',"error":null,"collected_at":"' + now_iso().encode() + b'","duration_ms":0.1}')


def test_synthetic_readings_pass_the_persisters_validation_at_realistic_size() -> None:
    """Every simulated host's reading of every type is what fleet_common.datatypes defines (the
    persister's check), at the size the bench relies on."""
    sizes = {}
    for i in range(40):
        host = Host(f"web-{i:02d}")
        for type_ in TYPES:
            for params in ({}, {"limit": 7, "sort_by": "name"}) if type_ == "processes" else ({},):
                payload = envelope(host, type_, params)
                response = parse_response(payload, ParsedTopic("res", "web-01", type_))
                assert response.status == "ok" and isinstance(response.data, dict)
                DATATYPES[type_].check_data(response.data, len(payload))
                check_data(type_, response.data, len(payload))
                sizes[type_] = len(payload)
    host = Host("web-01")
    sizes["processes"] = len(envelope(host, "processes", {}))
    data = json.loads(host.reading("processes", {}))
    assert len(data["processes"]) == 250 and 30_000 < sizes["processes"] < 60_000
    assert {"pid", "ppid", "name", "username", "status", "cpu_percent", "rss", "create_time"} <= set(
        data["processes"][0])


def test_synthetic_processes_honour_limit_and_sort_and_refuse_bad_params_like_the_agent() -> None:
    host = Host("db-02")
    top = json.loads(host.reading("processes", {"limit": 5, "sort_by": "rss"}))["processes"]
    assert len(top) == 5 and [p["rss"] for p in top] == sorted((p["rss"] for p in top), reverse=True)
    for bad in ({"limit": 0}, {"sort_by": "colour"}, {"depth": 1}):
        with pytest.raises(BadParams):
            host.reading("processes", bad)
    with pytest.raises(BadParams):
        host.reading("cpu", {"x": 1})


def _sim(procs: Procs, tmp_path: Path, config: Path, agents: int, name: str = "sim") -> Path:
    stats = tmp_path / f"{name}.json"
    procs.start(name, "fleet-sim", "--config", str(config), "--agents", str(agents), "--id-prefix", name,
                "--stats-file", str(stats), "--stats-every-s", "0.5")

    def connected() -> bool:
        try:
            return json.loads(stats.read_text()).get("all_connected_after_s") is not None
        except (OSError, ValueError):
            return False

    wait_for(connected, what=f"{agents} simulated agents to connect")
    return stats


@pytest.mark.slow
def test_simulated_agents_are_served_by_the_real_controller_and_persister_and_leave_a_last_will(
        procs: Procs, write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = write_config(controller={"schedule": {t: 30 for t in TYPES}, "tick_s": 0.1})
    procs.start_persister(config)
    db = tmp_path / "fleet.db"
    procs.start_controller(config)  # subscribed: the agents' births are news to it (first round at once)
    _sim(procs, tmp_path, config, agents=3)
    wait_for(lambda: len(rows(db, "SELECT DISTINCT agent_id, type FROM requests WHERE state = 'ok'")) == 3 * 7,
             what="an ok answer of every type from every simulated agent")
    procs_rows = rows(db, "SELECT data FROM requests WHERE type = 'processes' AND state = 'ok' LIMIT 1")
    assert len(json.loads(procs_rows[0]["data"])["processes"]) == 250
    assert rows(db, "SELECT COUNT(*) AS n FROM rejected")[0]["n"] == 0
    assert rows(db, "SELECT COUNT(*) AS n FROM agents WHERE online = 1")[0]["n"] == 3
    procs.stop("sim", sig=signal.SIGKILL)  # no goodbye: the broker publishes each agent's Last Will
    wait_for(lambda: rows(db, "SELECT COUNT(*) AS n FROM agents WHERE online = 0")[0]["n"] == 3,
             what="the Last Will of every simulated agent stored as offline")


class RequestLog:
    """Every request the broker carries under a prefix: (agent, type, issued_at)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.seen: list[tuple[str, str, float]] = []
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_connect = lambda cl, *a: cl.subscribe(f"{prefix}/+/req/+", qos=1)
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        _, agent, _, type_ = msg.topic.split("/")
        self.seen.append((agent, type_, parse_iso(json.loads(msg.payload)["issued_at"])))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_two_controller_shards_ask_every_agent_exactly_once_per_type_per_interval(
        procs: Procs, write_config: Callable[..., Path], tmp_path: Path, broker: EmbeddedBroker,
        prefix: str) -> None:
    interval_s, agents = 2, 24
    schedule = {t: interval_s for t in TYPES}
    sim_config = write_config("sim")
    _sim(procs, tmp_path, sim_config, agents=agents)  # statuses retained before the controllers start
    log = RequestLog(broker.port, prefix)
    for i in range(2):
        cfg = write_config(f"shard{i}", controller={"schedule": schedule, "tick_s": 0.1, "shard": f"{i}/2"})
        procs.start_controller(cfg, f"controller{i}")
    # Both watch agent status; the retained statuses follow each SUBACK at once, and the first
    # slot counted is an interval later.
    start = time.time() + interval_s
    time.sleep(4 * interval_s)
    end = time.time() - interval_s / 2
    for i in range(2):
        procs.stop(f"controller{i}")
    log.close()

    slots = interval_s * 1000 // SLOT_MS
    due: dict[tuple[str, str], list[int]] = {}
    for agent, type_, issued in log.seen:
        own = phase_ms(agent, type_, interval_s) // SLOT_MS
        now_slot = round(issued * 1000) // SLOT_MS
        due.setdefault((agent, type_), []).append(now_slot - (now_slot - own) % slots)
    first, last = int(start * 1000) // SLOT_MS, int(end * 1000) // SLOT_MS
    assert len({a for a, _ in due}) == agents and len(due) == agents * len(TYPES)
    for (agent, type_), got in due.items():
        expected: set[int] = {a for a in range(first, last + 1) if a % slots == phase_ms(agent, type_, interval_s)
                              // SLOT_MS}
        inside = [a for a in got if first <= a <= last]
        assert sorted(inside) == sorted(expected), f"{agent}/{type_}: asked at slots {sorted(got)}, due {expected}"
