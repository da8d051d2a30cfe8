"""fleetctl and foreign MQTT clients against a real stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, wait_for
from helpers import rows

from fleetctl.broker import free_port, port_open


def fleetctl(cfg: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fleetctl"), "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=timeout)


def mosquitto_rr() -> str:
    found = shutil.which("mosquitto_rr")
    if not found:
        pytest.fail("mosquitto_rr is not installed (package mosquitto-clients); run 'make test', which installs it")
    return found


def test_fleetctl_request_and_mosquitto_rr_both_get_answers(broker, prefix, write_config, procs) -> None:
    """`fleetctl request` and a foreign client (mosquitto_rr, using ResponseTopic and
    CorrelationData) both get the agent's answer."""
    cfg = write_config(agent={"id": "rr-host"})
    procs.start("agent", "fleet-agent", "--config", str(cfg))

    def ask() -> subprocess.CompletedProcess:
        done = fleetctl(cfg, "request", "rr-host", "cpu", "--timeout", "3")
        return done if done.returncode == 0 else None

    done = wait_for(ask, 30, interval_s=0.2, what="fleetctl request answered")
    answer = json.loads(done.stdout)
    assert answer["status"] == "ok" and answer["agent_id"] == "rr-host" and "percent" in answer["data"]

    done = fleetctl(cfg, "request", "rr-host", "processes", "--param", "limit=3", "--param", "sort_by=rss")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["data"]["processes"]) == 3

    rr = subprocess.run([mosquitto_rr(), "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5",
                         "-t", f"{prefix}/rr-host/req/memory", "-e", f"{prefix}/rr-host/res/memory",
                         "-m", '{"id": "by-hand-1"}', "-W", "10"], capture_output=True, text=True, timeout=20)
    assert rr.returncode == 0, rr.stderr
    answer = json.loads(rr.stdout)
    assert answer["id"] == "by-hand-1" and answer["status"] == "ok" and answer["data"]["virtual"]["total"] > 0


def test_fleetctl_request_to_an_absent_agent_says_so(write_config) -> None:
    """Asking an agent that is not there ends with a plain message and a non-zero exit, no traceback."""
    cfg = write_config()
    done = fleetctl(cfg, "request", "nobody", "cpu", "--timeout", "1")
    assert done.returncode != 0
    assert "agent 'nobody' has never connected" in done.stderr and "Traceback" not in done.stderr


def test_fleetctl_status_and_history_read_the_store(tmp_path, write_config, procs) -> None:
    """status lists the agent with answered/issued counts; history lists stored results."""
    cfg = write_config(agent={"id": "st-host"}, controller={"schedule": {"cpu": 1, "memory": 1}})
    procs.start_persister(cfg)
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    procs.start("agent", "fleet-agent", "--config", str(cfg))
    db = tmp_path / "fleet.db"
    wait_for(lambda: len(rows(db, "select id from requests where type='cpu' and state='ok'")) >= 2, 30,
             what="two stored cpu answers")

    done = fleetctl(cfg, "status", "--json")
    assert done.returncode == 0, done.stderr
    agent = next(a for a in json.loads(done.stdout) if a["agent_id"] == "st-host")
    assert agent["online"] and agent["answered"] >= 2 and agent["issued"] >= agent["answered"]
    assert agent["median_latency_ms"] is not None

    text = fleetctl(cfg, "status").stdout
    assert "st-host" in text and "online" in text

    done = fleetctl(cfg, "history", "st-host", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" ok ") >= 2 and "cpu " in done.stdout


def test_bad_config_key_stops_every_command_naming_the_key(tmp_path) -> None:
    """A misspelt key stops each command at start with one line naming it (no traceback)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mqtt:\n  prot: 1883\n")
    for command in ("fleet-agent", "fleet-controller", "fleet-persister", "fleetctl"):
        args = [str(BIN / command), "--config", str(cfg)] + (["status"] if command == "fleetctl" else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (command, done.stderr)
        assert "mqtt.prot" in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)


@pytest.mark.slow
def test_fleetctl_up_runs_the_whole_stack_and_stops_on_ctrl_c(tmp_path) -> None:
    """`fleetctl up` with no broker running starts its own Mosquitto, the persister, the controller
    and an agent; every built-in type is stored within 30 s; Ctrl-C stops all of it."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "mqtt": {"port": port, "topic_prefix": "up"},
        "agent": {"id": "up-host", "outbox_path": str(tmp_path / "outbox.db")},
        "persister": {"sqlite_path": str(tmp_path / "fleet.db")},
    }))
    out = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([str(BIN / "fleetctl"), "--config", str(cfg), "up",
                             "--broker-config", str(ROOT / "broker_config" / "dev.conf"),
                             "--data-dir", str(tmp_path / "data")],
                            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ})
    try:
        def all_types_stored() -> bool:
            text = (tmp_path / "up.log").read_text()
            lines = [ln for ln in text.splitlines() if "stored answers:" in ln]
            return bool(lines) and all(f"{t} " in lines[-1] for t in
                                       ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")) \
                and "1 online of 1" in lines[-1]
        wait_for(all_types_stored, 30, interval_s=0.5, what="the up summary to show every type stored")
        assert port_open("127.0.0.1", port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not port_open("127.0.0.1", port), "the embedded broker is still running"
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        print((tmp_path / "up.log").read_text()[-4000:], file=sys.stderr)
