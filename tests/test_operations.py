"""Operating the stack: the compose file and Dockerfiles (checked statically: Docker cannot
run here), health checks, Prometheus metrics, logs and `fleetctl status --watch`."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import BIN, ROOT, Procs, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fleet_common import Request, Response, Status, Topics, iso, new_id
from fleet_common.config import SECTIONS, load_config
from fleet_common.datatypes import example
from fleet_common.health import Heartbeat, Readiness, check, read_beat, wait_ready
from fleet_store import open_store
from fleetctl import views
from fleetctl.broker import free_port

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
FLEET_SERVICES = {"controller": "fleet-controller", "persister": "fleet-persister", "agent": "fleet-agent",
                  "dashboard": "fleet-dashboard"}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def console_scripts() -> dict[str, str]:
    """Console script -> the distribution that installs it."""
    return {ep.name: ep.dist.name for ep in entry_points(group="console_scripts") if ep.dist is not None}


def dist_folders() -> dict[str, str]:
    """Distribution name -> its folder in this repository."""
    out = {}
    for pyproject in ROOT.glob("*/pyproject.toml"):
        match = re.search(r'^name = "([^"]+)"', pyproject.read_text(), re.M)
        if match:
            out[match.group(1)] = pyproject.parent.name
    return out


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in dockerfile(path):
        if instr == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


def service_dockerfile(name: str) -> Path:
    return ROOT / compose()["services"][name]["build"]["dockerfile"]


def assert_real_config_keys(env: dict[str, str], where: str) -> None:
    fleet = {k: str(v) for k, v in env.items() if k.startswith("FLEET_")}
    cfg = load_config(str(ROOT / "config.yaml"), env=fleet)  # an unknown key raises ConfigError naming it
    for name, value in fleet.items():
        rest = name[len("FLEET_"):].lower()
        section = next(s for s in SECTIONS if rest.startswith(s + "_"))
        loaded = cfg.get(f"{section}.{rest[len(section) + 1:]}")
        assert str(loaded).lower() == value.lower(), f"{where}: {name}={value} loaded as {loaded!r}"


# ------------------------------------------------------------------ compose and Dockerfiles

def test_compose_has_the_stack_with_health_checks_and_restart_policies() -> None:
    """docker-compose.yml parses and defines mosquitto, mongo (with a volume), controller, persister on
    MongoDB, one agent, the dashboard, Prometheus and Grafana, each with a health check and a restart policy."""
    doc = compose()
    services = doc["services"]
    assert set(services) == {"mosquitto", "mongo", "controller", "persister", "agent", "dashboard", "prometheus",
                             "grafana"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert any(v.endswith(":/data/db") and v.split(":")[0] in doc["volumes"] for v in services["mongo"]["volumes"])
    assert services["persister"]["environment"]["FLEET_PERSISTER_STORE"] == "mongodb"
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] in ("unless-stopped", "always", "on-failure"), name
    for name in FLEET_SERVICES:
        assert all(dep in services for dep in services[name]["depends_on"])
        assert services[name]["depends_on"]["mosquitto"]["condition"] == "service_healthy"


def test_compose_broker_config_exists_and_listens_beyond_loopback() -> None:
    """The broker config the compose file names is in broker_config/ and listens on all interfaces
    (other containers must reach it)."""
    service = compose()["services"]["mosquitto"]
    mount = next(v for v in service["volumes"] if v.endswith(":/mosquitto/config:ro"))
    conf = service["command"][service["command"].index("-c") + 1]
    local = ROOT / mount.split(":")[0] / Path(conf).relative_to("/mosquitto/config")
    assert local.is_file(), local
    assert re.search(r"^listener 1883\s*$", local.read_text(), re.M)


def test_compose_commands_are_console_scripts_installed_by_their_image() -> None:
    """Each fleet service's command is a console script of a distribution its Dockerfile copies and
    installs, and the Dockerfile's CMD is the same command."""
    scripts, folders = console_scripts(), dist_folders()
    for name, script in FLEET_SERVICES.items():
        service = compose()["services"][name]
        assert service["command"] == [script]
        assert script in scripts, f"{script} is not an installed console script"
        steps = dockerfile(service_dockerfile(name))
        copied = {shlex.split(args)[0] for instr, args in steps if instr == "COPY"}
        assert folders[scripts[script]] in copied
        assert json.loads(next(args for instr, args in steps if instr == "CMD")) == [script]


def test_compose_and_dockerfile_environment_uses_real_config_keys() -> None:
    """Every FLEET_* variable in docker-compose.yml and the Dockerfiles is a config key, and loads as the
    value it sets."""
    for name, service in compose()["services"].items():
        assert_real_config_keys(service.get("environment") or {}, f"docker-compose.yml service {name}")
    for path in DOCKERFILES:
        assert_real_config_keys(dockerfile_env(path), path.name)


@pytest.mark.parametrize("service", [
    "controller", "persister", "agent", "dashboard",
])
def test_health_check_commands_exist(service: str) -> None:
    """The compose and Dockerfile health checks of a fleet service run `<its command> --check`, an
    option the installed command accepts."""
    script = FLEET_SERVICES[service]
    assert compose()["services"][service]["healthcheck"]["test"] == ["CMD", script, "--check"]
    health = next(args for instr, args in dockerfile(service_dockerfile(service)) if instr == "HEALTHCHECK")
    assert json.loads(health.split("CMD", 1)[1]) == [script, "--check"]
    out = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--check" in out


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    """Every COPY source of every Dockerfile exists in the repository and is not excluded by .dockerignore."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert DOCKERFILES
    for path in DOCKERFILES:
        for instr, args in dockerfile(path):
            if instr == "COPY":
                source = shlex.split(args)[0]
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}"
                assert source.split("/")[0] not in ignored, f"{path.name}: {source} is in .dockerignore"


def test_agent_image_is_slim_with_only_its_own_dependencies() -> None:
    """The agent image starts from a slim Python and installs only fleet-common and the agent, whose
    dependencies exclude the services' (no pymongo, APScheduler or prometheus_client)."""
    steps = dockerfile(ROOT / "docker" / "agent.Dockerfile")
    assert re.match(r"python:3\.\d+-slim", next(args for instr, args in steps if instr == "FROM"))
    copied = {src for instr, args in steps if instr == "COPY" for src in shlex.split(args)[:-1]}
    assert copied == {"VERSION", "constraints.txt", "common", "agent"}
    deps = " ".join((ROOT / d / "pyproject.toml").read_text().split("dependencies", 1)[1].split("\n", 1)[0]
                    for d in ("common", "agent")).lower()
    for heavy in ("pymongo", "apscheduler", "prometheus"):
        assert heavy not in deps


def test_ci_workflow_runs_real_services_and_the_agent_elsewhere() -> None:
    """The CI workflow runs the suite on Linux with mongo and eclipse-mosquitto service containers and
    FLEET_TEST_MONGODB_URI set, and the agent's tests on Windows and macOS."""
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    linux, agent = doc["jobs"]["linux"], doc["jobs"]["agent"]
    images = {s["image"].split(":")[0] for s in linux["services"].values()}
    assert images == {"mongo", "eclipse-mosquitto"}
    assert linux["env"]["FLEET_TEST_MONGODB_URI"].startswith("mongodb://")
    assert set(agent["strategy"]["matrix"]["os"]) == {"windows-latest", "macos-latest"}
    runs = " ".join(step.get("run", "") for step in linux["steps"] + agent["steps"])
    assert "make test" in runs and "tests/test_collectors.py" in runs and "scripts/smoke-stack.sh" in runs
    assert (ROOT / "scripts" / "smoke-stack.sh").stat().st_mode & 0o111


def test_systemd_unit_is_hardened() -> None:
    """The agent's systemd unit runs as a dedicated user with ProtectSystem=strict and NoNewPrivileges."""
    unit = (ROOT / "agent" / "fleet-agent.service").read_text()
    for line in ("User=fleet-agent", "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert re.search(r"^ExecStart=\S*fleet-agent --config \S+$", unit, re.M)


# ------------------------------------------------------------------ health

def test_check_passes_for_a_fresh_heartbeat_and_fails_when_stale_unhealthy_or_missing(tmp_path: Path) -> None:
    """check() is 0 for a fresh heartbeat naming no problems, and 1 for a stale one, one naming a
    problem, an unreadable one or none at all."""
    path = tmp_path / "hb.json"
    problems: list[str] = []
    beat = Heartbeat(str(path), "svc", 5.0, lambda: {"n": 1}, lambda: problems)
    assert check(str(path))[0] == 1
    beat.beat()
    assert check(str(path))[0] == 0
    assert check(str(path), now_s=time.time() + 16)[0] == 1
    problems.append("not connected")
    beat.beat()
    code, why = check(str(path))
    assert code == 1 and "not connected" in why
    path.write_text("{half")
    assert check(str(path))[0] == 1


def test_the_heartbeat_says_ready_at_once_and_wait_ready_waits_for_that_process(tmp_path: Path) -> None:
    """A change of readiness is written at once, not at the next beat (an hour away here); wait_ready
    waits for `ready` from the given pid, so a stale file from an earlier run never counts."""
    path, ready = tmp_path / "hb.json", Readiness()
    with Heartbeat(str(path), "svc", 3600.0, lambda: {}, ready=ready):
        beat = read_beat(str(path))
        assert beat is not None and beat["ready"] is False
        assert not wait_ready(str(path), os.getpid(), 0.2)
        threading.Timer(0.2, ready.set).start()
        assert wait_ready(str(path), os.getpid(), 10)
        assert not wait_ready(str(path), os.getpid() + 1, 0.2), "another process's heartbeat"
        ready.clear()
        wait_for(lambda: (read_beat(str(path)) or {}).get("ready") is False, 5, 0.01, what="not ready, at once")
    assert read_beat(str(path)) is None  # removed on stop
    assert "ready" not in Heartbeat(str(path), "agent", 5.0, lambda: {}).payload()  # only where it means something


def test_service_check_follows_its_heartbeat(procs: Procs, write_config: Callable[..., Path], tmp_path: Path) -> None:
    """fleet-persister --check exits 0 while the persister runs and is connected, and 1 once it is stopped;
    fleet-controller --check exits 1 when its killed process leaves a heartbeat that goes stale."""
    cfg = write_config(persister={"heartbeat_path": str(tmp_path / "p.json"), "heartbeat_interval_s": 0.2},
                       controller={"heartbeat_path": str(tmp_path / "c.json"), "heartbeat_interval_s": 0.2})

    def checks(command: str) -> int:
        return subprocess.run([str(BIN / command), "--config", str(cfg), "--check"], capture_output=True,
                              timeout=60).returncode

    assert checks("fleet-persister") == 1
    procs.start_persister(cfg)
    procs.start_controller(cfg)  # both say ready once subscribed: the heartbeat is rewritten at once
    wait_for(lambda: checks("fleet-persister") == 0, what="fleet-persister --check to pass")
    wait_for(lambda: checks("fleet-controller") == 0, what="fleet-controller --check to pass")
    beat = json.loads((tmp_path / "p.json").read_text())
    assert beat["counters"]["connected"] is True and "received" in beat["counters"] and beat["ready"] is True
    assert json.loads((tmp_path / "c.json").read_text())["ready"] is True
    assert procs.stop("persister") == 0
    assert checks("fleet-persister") == 1
    procs.stop("controller", signal.SIGKILL)
    assert (tmp_path / "c.json").exists()
    wait_for(lambda: checks("fleet-controller") == 1, what="the killed controller's heartbeat to go stale")


def test_agent_check_and_its_counters_in_status(procs: Procs, write_config: Callable[..., Path], tmp_path: Path,
                                                broker: Any, prefix: str) -> None:
    """fleet-agent --check follows its heartbeat, and the agent reports its own counters (outbox,
    answers, errors) in its retained status message, since it serves no metrics."""
    cfg = write_config(agent={"id": "hb-agent", "heartbeat_path": str(tmp_path / "a.json"),
                              "heartbeat_interval_s": 0.2})

    def check_agent() -> int:
        return subprocess.run([str(BIN / "fleet-agent"), "--config", str(cfg), "--check"], capture_output=True,
                              timeout=60).returncode

    assert check_agent() == 1
    procs.start("agent", "fleet-agent", "--config", str(cfg))
    wait_for(lambda: check_agent() == 0, what="fleet-agent --check to pass")
    beat = json.loads((tmp_path / "a.json").read_text())
    assert beat["counters"]["connected"] is True and beat["counters"]["outbox"]["dropped"] == 0

    got: list[dict[str, Any]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(Topics(prefix).status("hb-agent"), qos=1)
    sub.loop_start()
    try:
        status = wait_for(lambda: got[-1] if got else None, what="the agent's retained status")
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert status["online"] is True
    assert set(status["outbox"]) >= {"queued", "dropped"}
    assert set(status["counters"]) >= {"received", "answered", "errors", "timeouts"}
    assert procs.stop("agent") == 0
    assert check_agent() == 1


# ------------------------------------------------------------------ metrics

def scrape(port: int) -> dict[str, float]:
    """{'name{label="v",...}': value} of every sample; {} while the endpoint is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{new_id()[-10:]}", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_persister_metrics_move_with_traffic(procs: Procs, write_config: Callable[..., Path], broker: Any,
                                             prefix: str) -> None:
    """A real fleet-persister with metrics enabled serves Prometheus metrics whose counters move: requests and
    answers per type, rejected by reason, batch sizes and commit times."""
    port = free_port()
    cfg = write_config(persister={"metrics_enabled": True, "metrics_port": port})
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_for(lambda: scrape(port).get("fleet_persister_mqtt_connected") == 1, what="the persister's metrics")
    topics, c = Topics(prefix), publisher(broker.port)
    for _ in range(3):
        req = Request(id=new_id(), type="cpu", issued_at=iso(time.time()), expires_at=iso(time.time() + 60))
        c.publish(topics.request("web-01", "cpu"), req.payload(), qos=1).wait_for_publish(5)
        res = Response.ok(req.id, "web-01", "cpu", example("cpu", percent=1.0), 1.0)
        c.publish(topics.response("web-01", "cpu"), res.payload(), qos=1).wait_for_publish(5)
    c.publish(topics.response("web-01", "cpu"), b"{not json", qos=1).wait_for_publish(5)
    c.loop_stop()
    m = wait_for(lambda: (lambda m: m if m.get('fleet_persister_answers_total{state="ok",type="cpu"}') == 3
                          and m.get('fleet_persister_rejected_total{reason="bad_json"}') == 1 else None)(scrape(port)),
                 what="the persister's counters to count 3 answers and 1 rejected message")
    assert m['fleet_persister_requests_total{type="cpu"}'] == 3
    assert m['fleet_persister_answered_ratio{type="cpu"}'] == 1.0
    assert m["fleet_persister_batch_size_count"] >= 1 and m["fleet_persister_batch_size_sum"] == 7
    assert m["fleet_persister_commit_seconds_count"] == m["fleet_persister_batch_size_count"]
    assert m["fleet_persister_messages_received_total"] == 7 and m["fleet_persister_backlog"] == 0
    assert m["fleet_persister_mqtt_reconnects_total"] == 0


def test_controller_metrics_count_requests_issued_per_type(procs: Procs, write_config: Callable[..., Path],
                                                           broker: Any, prefix: str) -> None:
    """A real fleet-controller with metrics enabled counts the requests it issues per type and the agents it knows."""
    port = free_port()
    cfg = write_config(controller={"metrics_enabled": True, "metrics_port": port})
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    wait_for(lambda: scrape(port).get("fleet_controller_mqtt_connected") == 1, what="the controller's metrics")
    assert scrape(port)['fleet_controller_requests_issued_total{type="ping"}'] == 0
    c = publisher(broker.port)
    status = Status(agent_id="web-01", online=True, hostname="web-01", platform="test", agent_version="0",
                    types=["ping", "memory"])
    c.publish(Topics(prefix).status("web-01"), status.payload(), qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    m = wait_for(lambda: (lambda m: m if m.get('fleet_controller_requests_issued_total{type="memory"}')
                          and m.get('fleet_controller_requests_issued_total{type="ping"}') else None)(scrape(port)),
                 what="the controller to ask the new agent for memory and ping")
    assert m['fleet_controller_requests_issued_total{type="cpu"}'] == 0  # not advertised, not asked
    assert m["fleet_controller_agents_online"] == 1 and m["fleet_controller_agents_known"] == 1


def test_metrics_are_off_by_default(procs: Procs, write_config: Callable[..., Path], tmp_path: Path) -> None:
    """Without metrics_enabled nothing listens on the metrics port."""
    port = free_port()
    cfg = write_config(persister={"metrics_port": port, "heartbeat_path": str(tmp_path / "p.json"),
                                  "heartbeat_interval_s": 0.2})
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_for(lambda: json.loads((tmp_path / "p.json").read_text())["counters"]["connected"]
             if (tmp_path / "p.json").exists() else False, what="the persister to connect")
    assert scrape(port) == {}


# ------------------------------------------------------------------ logs

def test_json_logs_are_one_parseable_line_per_state_change(procs: Procs, write_config: Callable[..., Path],
                                                           broker: Any, prefix: str) -> None:
    """With --log-format json every line the persister writes is a JSON object with ts, level, logger and msg,
    and 200 messages stored at --log-level info add no log line per message."""
    cfg = write_config()
    procs.start_persister(cfg, "persister", "--log-format", "json", "--log-level", "info")
    c = publisher(broker.port)
    for _ in range(200):
        req = Request(id=new_id(), type="ping", issued_at=iso(time.time()), expires_at=iso(time.time() + 60))
        c.publish(Topics(prefix).request("web-01", "ping"), req.payload(), qos=1)
    c.publish(Topics(prefix).request("web-01", "ping"), b"[]", qos=1).wait_for_publish(5)
    c.loop_stop()
    wait_for(lambda: "first rejected message" in procs.log("persister"), what="the rejected message's warning")
    assert procs.stop("persister") == 0
    lines = procs.log("persister").splitlines()
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert not any(r["level"] == "debug" for r in records)
    assert len(records) < 15, "a log line per message"
    assert any("stored 200" in r["msg"] for r in records)


# ------------------------------------------------------------------ fleetctl status --watch

class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_on_a_terminal() -> None:
    """On a terminal each frame starts at the cursor's home and clears what the previous one left."""
    out, stop, frames = Tty(), threading.Event(), []

    def frame() -> str:
        frames.append(1)
        if len(frames) == 3:
            stop.set()
        return "line one\nline two" if len(frames) == 1 else "short"

    views.watch(frame, 0.01, stop, out)
    text = out.getvalue()
    assert text.count("\x1b[H") == 3 and text.count("\x1b[J") == 3
    assert "line two\x1b[K\n" in text


def test_status_watch_json_prints_a_line_per_refresh_until_stopped(procs: Procs, write_config: Callable[..., Path],
                                                                  tmp_path: Path) -> None:
    """fleetctl status --watch --json, piped, prints one JSON document per refresh and exits 0 on SIGTERM."""
    cfg = write_config()
    open_store(load_config(str(cfg), env={}).persister).close()  # readers never create it
    proc = procs.start("watch", "fleetctl", "--config", str(cfg), "status", "--watch", "0.2", "--json")
    wait_for(lambda: len(procs.log("watch").splitlines()) >= 3, what="three refreshes")
    assert procs.stop("watch") == 0 and proc.returncode == 0
    for line in procs.log("watch").splitlines():
        assert json.loads(line)["agents"] == []


def test_status_json_without_watch_is_unchanged(write_config: Callable[..., Path]) -> None:
    """fleetctl status --json still prints one JSON list and exits."""
    cfg = write_config()
    open_store(load_config(str(cfg), env={}).persister).close()  # readers never create it
    out = subprocess.run([str(BIN / "fleetctl"), "--config", str(cfg), "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == []

