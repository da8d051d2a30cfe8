"""controller.groups and SIGHUP reloads in a real `fleet-controller` against a real Mosquitto,
with fake agents (paho clients) that carry labels in their births."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import ROOT, wait_for
from test_controller import FakeFleet

from fleet_common.messages import Status, parse_request
from fleet_common.timefmt import parse_iso

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(broker: Any, prefix: str) -> Iterator[FakeFleet]:
    f = FakeFleet(broker.port, prefix)
    yield f
    f.close()


def born(fleet: FakeFleet, agent_id: str, labels: dict[str, str], types: list[str]) -> None:
    status = Status(agent_id=agent_id, online=True, hostname=agent_id, types=types, labels=labels)
    fleet.client.publish(fleet.topics.status(agent_id), status.payload(), qos=1, retain=True).wait_for_publish(10)


def issued(msgs: list[mqtt.MQTTMessage], fleet: FakeFleet) -> list[float]:
    """When each request was issued, by its payload."""
    out = []
    for m in msgs:
        at = parse_request(bytes(m.payload), fleet.topics.parse(m.topic)).issued_at
        assert at is not None
        out.append(parse_iso(at))
    return sorted(out)


def rewrite(config: Path, **controller: Any) -> None:
    """The same config file with these controller keys changed, as an operator edits it."""
    data = yaml.safe_load(config.read_text())
    data["controller"].update(controller)
    config.write_text(yaml.safe_dump(data))


def hup_and_wait(procs: Any, config_log: str, what: str) -> float:
    """SIGHUP the controller; wait for the log line `what` after it; the time it was sent."""
    before = procs.log(config_log).count(what)
    sent = time.time()
    procs.procs[config_log].send_signal(signal.SIGHUP)
    wait_for(lambda: procs.log(config_log).count(what) > before, what=f"'{what}' in the controller's log")
    return sent


def test_groups_change_intervals_and_new_labels_move_an_agent(fleet: FakeFleet, write_config: Any,
                                                               procs: Any) -> None:
    """db agents are asked for cpu every second and never for ping, web agents every 3 s; an
    agent born again with other labels takes its new group's intervals at once."""
    born(fleet, "web-01", {"role": "web"}, ["cpu", "ping"])
    born(fleet, "db-01", {"role": "db", "dc": "ams"}, ["cpu", "ping"])
    config = write_config(controller={"schedule": {"cpu": 3, "ping": 3}, "tick_s": 0.2,
                                      "groups": [{"match": {"role": "db"}, "schedule": {"cpu": 1, "ping": 0}}]})
    procs.start_controller(config)

    wait_for(lambda: len(fleet.asked("db-01", "cpu")) >= 7, what="seven cpu requests to db-01")
    assert 1 <= len(fleet.asked("web-01", "cpu")) <= 4  # about 7 s at one every 3 s
    assert fleet.asked("db-01", "ping") == [] and fleet.asked("web-01", "ping")

    born(fleet, "db-01", {"role": "web"}, ["cpu", "ping"])  # relabelled, without going offline
    relabelled = time.time()
    wait_for(lambda: len([t for t in issued(fleet.asked("web-01", "cpu"), fleet) if t > relabelled]) >= 3,
             what="three more cpu requests to web-01")
    after = [t for t in issued(fleet.asked("db-01", "cpu"), fleet) if t > relabelled + 0.5]
    assert 1 <= len(after) <= 4, after  # 6 to 9 s at one every 3 s, not one a second
    assert all(b - a > 2.0 for a, b in zip(after, after[1:])), after
    wait_for(lambda: fleet.asked("db-01", "ping"), what="db-01, now web, asked for ping")
    assert procs.stop("controller") == 0


def test_sighup_applies_a_new_schedule_without_a_burst(fleet: FakeFleet, write_config: Any, procs: Any) -> None:
    """After SIGHUP adds a 1 s ping for db agents, they get it; cpu, whose interval is unchanged,
    keeps its phase (no request closer to the previous than the interval allows), web agents are
    not asked for ping, nobody gets a first round, and a key that needs a restart is named."""
    agents = [f"a{i:02d}" for i in range(20)]
    for i, agent in enumerate(agents):
        born(fleet, agent, {"role": "db" if i % 2 else "web"}, ["cpu", "ping"])
    config = write_config(controller={"schedule": {"cpu": 4}, "tick_s": 0.2})
    procs.start_controller(config)
    wait_for(lambda: all(fleet.asked(a, "cpu") for a in agents), what="a cpu request to every agent")

    rewrite(config, groups=[{"match": {"role": "db"}, "schedule": {"ping": 1}}], tick_s=0.3)
    sent = hup_and_wait(procs, "controller", "reloaded the schedule")
    log = procs.log("controller")
    assert "10 agents changed intervals (10 types turned on, 0 turned off, 0 at a new interval)" in log
    assert any("controller.tick_s changed in the file" in line and "restart" in line for line in log.splitlines())

    db, web = agents[1::2], agents[0::2]
    wait_for(lambda: all(len(fleet.asked(a, "ping")) >= 3 for a in db), what="three pings to every db agent")
    wait_for(lambda: all(len([t for t in issued(fleet.asked(a, "cpu"), fleet) if t > sent]) >= 2
                         for a in agents), timeout_s=30, what="two cpu requests to every agent after the reload")
    for agent in agents:
        cpu = issued(fleet.asked(agent, "cpu"), fleet)
        assert all(b - a > 3.0 for a, b in zip(cpu, cpu[1:])), (agent, cpu)  # 4 s apart, give or take a tick
    assert all(fleet.asked(a, "ping") == [] for a in web)
    first_second = [t for a in agents for ty in ("cpu", "ping") for t in issued(fleet.asked(a, ty), fleet)
                    if sent <= t < sent + 1.0]
    assert len(first_second) <= 20  # 10 new pings and about 5 cpu a second; a first round would be 40
    assert procs.stop("controller") == 0


def test_sighup_refuses_a_bad_file_and_keeps_the_schedule(fleet: FakeFleet, write_config: Any,
                                                          procs: Any) -> None:
    """A file with a bad group, or one that is not YAML, is refused with one line naming the key
    (or the line), and the controller goes on asking on the schedule it had; a fixed file then
    reloads."""
    born(fleet, "db-01", {"role": "db"}, ["cpu", "ping"])
    config = write_config(controller={"schedule": {"cpu": 1}, "tick_s": 0.2})
    procs.start_controller(config)
    wait_for(lambda: fleet.asked("db-01", "cpu"), what="a cpu request")

    good = config.read_text()
    rewrite(config, groups=[{"match": {"role": "no good"}, "schedule": {"cpu": 0}}])
    hup_and_wait(procs, "controller", "reload refused")
    line = next(x for x in procs.log("controller").splitlines() if "reload refused" in x)
    assert "controller.groups[0].match" in line and "the running schedule stays" in line
    config.write_text(good + "controller: [\n")
    hup_and_wait(procs, "controller", "(not valid YAML)")
    assert "Traceback" not in procs.log("controller")

    count = len(fleet.asked("db-01", "cpu"))
    wait_for(lambda: len(fleet.asked("db-01", "cpu")) >= count + 2, what="cpu requests going on")
    assert fleet.asked("db-01", "ping") == []

    config.write_text(good)
    rewrite(config, groups=[{"match": {"role": "db"}, "schedule": {"ping": 1}}])
    hup_and_wait(procs, "controller", "reloaded the schedule")
    wait_for(lambda: fleet.asked("db-01", "ping"), what="a ping after the fixed file is loaded")
    assert procs.procs["controller"].poll() is None  # it never stopped
    assert procs.stop("controller") == 0


def test_the_units_execreload_reloads_a_running_controller(fleet: FakeFleet, write_config: Any, procs: Any) -> None:
    """`systemctl reload fleet-controller` runs the unit's ExecReload with $MAINPID set: run here
    as systemd would, it makes a running controller reload its schedule."""
    unit = (ROOT / "controller" / "fleet-controller.service").read_text()
    assert re.search(r"^ExecStart=\S*fleet-controller --config \S+$", unit, re.M)
    reload_line = re.search(r"^ExecReload=(.+)$", unit, re.M)
    assert reload_line is not None
    config = write_config(controller={"schedule": {"cpu": 60}, "tick_s": 0.2})
    proc = procs.start_controller(config)
    rewrite(config, schedule={"cpu": 30})
    argv = shlex.split(reload_line[1].replace("$MAINPID", str(proc.pid)))
    assert subprocess.run(argv, timeout=10).returncode == 0
    wait_for(lambda: re.search(r"reloaded the schedule in \d+ ms: cpu=30s", procs.log("controller")),
             what="the reload in the log")
    assert procs.stop("controller") == 0
