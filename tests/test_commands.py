"""The commands a new user types: global options anywhere, config errors in one line, refused
arguments, requests to unknown or offline agents, read-only commands that create nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, wait_for

from fleet_common.config import load_config
from fleet_common.link import SHORT_LIVED_IN_A_ROW
from fleet_store import open_store
from fleetctl.broker import free_port, port_open
from fleetctl.cli import parser

SERVICES = ("fleet-agent", "fleet-controller", "fleet-persister", "fleet-sim", "fleet-dashboard")
# one harmless argument each service takes, so the global options come after something
SERVICE_ARG = {"fleet-agent": "--check", "fleet-controller": "--check", "fleet-persister": "--check",
               "fleet-sim": "--agents=1", "fleet-dashboard": "--check"}


def run(command: str, *args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("mqtt:\n  prot: 1883\n")
    return path


def positionals(name: str) -> list[str]:
    """Placeholder values for a subcommand's required arguments (positional, or options such as --role)."""
    sub = parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
    values: list[str] = []
    for action in sub._actions:
        if action.required:
            value = str(action.choices[0]) if action.choices else "x"  # type: ignore[index]
            values += [action.option_strings[0], value] if action.option_strings else [value]
    return values


def test_global_options_parse_before_or_after_every_fleetctl_subcommand() -> None:
    """Every fleetctl subcommand takes --config/--log-level/--log-format after its name too."""
    names = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in names:
        opts = ["--config", "c.yaml", "--log-level", "debug", "--log-format", "json"]
        for argv in ([*opts, name, *positionals(name)], [name, *positionals(name), *opts]):
            args = parser().parse_args(argv)
            assert (args.config, args.log_level, args.log_format) == ("c.yaml", "debug", "json"), (name, argv)
        args = parser().parse_args([name, *positionals(name)])
        assert args.config is None and args.log_level is None, name


def test_config_after_the_subcommand_is_read_by_fleetctl(tmp_path) -> None:
    """`fleetctl status --config X` reads X (here a bad key, so it stops naming it)."""
    done = run("fleetctl", "status", "--config", str(bad_config(tmp_path)), "--log-level", "error", cwd=tmp_path)
    assert done.returncode == 2 and "mqtt.prot" in done.stderr, done.stderr


@pytest.mark.parametrize("command", SERVICES)
def test_config_after_other_options_is_read_by_every_service(tmp_path, command) -> None:
    """Each service reads --config and the log options wherever they stand on its command line."""
    done = run(command, SERVICE_ARG[command], "--log-format", "json", "--log-level", "error",
               "--config", str(bad_config(tmp_path)), cwd=tmp_path)
    assert done.returncode == 2 and "mqtt.prot" in done.stderr, (command, done.stderr)


FIVE = ("fleetctl", "fleet-agent", "fleet-controller", "fleet-persister", "fleet-dashboard")
FIVE_ARGS = {"fleetctl": ["status"], "fleet-agent": ["--check"], "fleet-controller": ["--check"],
             "fleet-persister": ["--check"], "fleet-dashboard": ["--check"]}


def broken_configs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a config path that cannot be used, what the one line must say)."""
    folder = tmp_path / "conf.d"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"mqtt:\n  host: caf\xe9\n")
    yaml_error = tmp_path / "indent.yaml"
    yaml_error.write_text("mqtt:\n  port: 1883\n host: x\n")
    return {"directory": (folder, f"file {folder}: is a directory"),
            "not utf-8": (latin1, f"file {latin1}: is not UTF-8"),
            "yaml": (yaml_error, f"file {yaml_error}, line 3: ")}


@pytest.mark.parametrize("command", FIVE)
def test_an_unusable_config_file_is_one_line_naming_it_in_every_command(tmp_path, command) -> None:
    """A directory, a non-UTF-8 file or bad YAML as --config: one line naming the file (and the
    line), exit 2, no traceback."""
    for kind, (path, says) in broken_configs(tmp_path).items():
        done = run(command, *FIVE_ARGS[command], "--config", str(path), cwd=tmp_path)
        assert done.returncode == 2, (command, kind, done.stderr)
        assert done.stderr.startswith(f"{command}: {says}"), (command, kind, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, (command, kind, done.stderr)


def store_config(tmp_path: Path, create: bool = True) -> Path:
    """A config whose SQLite store is tmp_path/fleet.db, created (empty) when `create`."""
    cfg = tmp_path / "store.yaml"
    cfg.write_text(f"persister:\n  sqlite_path: {tmp_path / 'fleet.db'}\n")
    if create:
        open_store(load_config(str(cfg), env={}).persister).close()
    return cfg


def test_history_of_an_unknown_type_fails_listing_the_known_ones(tmp_path) -> None:
    """`fleetctl history AGENT cpuu` exits non-zero and lists the known types."""
    cfg = store_config(tmp_path)
    done = run("fleetctl", "history", "web-01", "cpuu", "--config", str(cfg), cwd=tmp_path)
    assert done.returncode != 0 and "unknown type 'cpuu'" in done.stderr, done.stderr
    assert "cpu, disk, memory, network, os_info, ping, processes" in done.stderr
    assert run("fleetctl", "history", "web-01", "cpu", "--config", str(cfg), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("limit", ["0", "-3", "many"])
def test_history_refuses_a_limit_below_one(tmp_path, limit) -> None:
    """--limit 0, a negative or a non-number is refused by the argument parser (exit 2)."""
    done = run("fleetctl", "history", "web-01", "cpu", f"--limit={limit}", "--config", str(store_config(tmp_path)),
               cwd=tmp_path)
    assert done.returncode == 2 and "argument --limit" in done.stderr, done.stderr


def request(cfg: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = run("fleetctl", "request", *args, "--config", str(cfg), cwd=cfg.parent)
    return done, time.monotonic() - started


def start_agent(procs, cfg: Path, agent_id: str) -> None:
    procs.start(agent_id, "fleet-agent", "--config", str(cfg), "--id", agent_id)
    wait_for(lambda: request(cfg, agent_id, "ping", "--timeout", "2")[0].returncode == 0, 30,
             what=f"agent {agent_id} to answer")


def test_request_to_an_agent_never_seen_fails_at_once_naming_known_agents(write_config, procs) -> None:
    """An agent with no retained status: refused within a second of connecting, naming the known agents."""
    cfg = write_config()
    start_agent(procs, cfg, "known-1")
    done, took = request(cfg, "nosuchagent", "cpu", "--timeout", "10")
    assert done.returncode != 0 and took < 3, (took, done.stderr)
    assert "agent 'nosuchagent' has never connected" in done.stderr, done.stderr
    assert "known agents: known-1 (online)" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_request_to_an_offline_agent_says_it_waits_at_the_broker_until_it_expires(write_config, procs) -> None:
    """An agent that said goodbye: told apart from a slow one, with how long the request waits at the broker."""
    cfg = write_config()
    start_agent(procs, cfg, "gone-1")
    assert procs.stop("gone-1") == 0
    done, _ = request(cfg, "gone-1", "cpu", "--timeout", "1.5")
    assert done.returncode != 0, done.stderr
    assert "agent 'gone-1' is offline" in done.stderr and "waits at the broker until it expires, 1.5 s" \
        in done.stderr, done.stderr
    assert "it is offline" in done.stderr and "expired at the broker" in done.stderr, done.stderr


def test_request_to_an_online_agent_that_does_not_answer_says_it_is_online(broker, prefix, write_config) -> None:
    """An agent whose status says online but that does not answer: 'online', not 'offline' or 'never seen'."""
    cfg = write_config()
    status = json.dumps({"v": 1, "agent_id": "mute-1", "online": True, "ts": "2026-01-01T00:00:00.000Z"})
    subprocess.run([shutil.which("mosquitto_pub") or "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port),
                    "-r", "-q", "1", "-t", f"{prefix}/mute-1/status", "-m", status], check=True, timeout=10)
    done, _ = request(cfg, "mute-1", "cpu", "--timeout", "1")
    assert done.returncode != 0 and "though it is online" in done.stderr, done.stderr


@pytest.mark.parametrize("timeout", ["0", "-1", "soon"])
def test_request_refuses_a_timeout_that_is_not_above_zero(tmp_path, timeout) -> None:
    """--timeout 0, negative or not a number: refused by the argument parser, not 'cannot reach the broker'."""
    done = run("fleetctl", "request", "web-01", "cpu", f"--timeout={timeout}", cwd=tmp_path)
    assert done.returncode == 2 and "argument --timeout" in done.stderr, done.stderr
    assert "cannot reach" not in done.stderr


def test_request_is_quiet_on_stderr_unless_asked(write_config, procs) -> None:
    """A successful request prints no INFO connect/disconnect lines, even with log.level debug in the
    config; --log-level info brings them back."""
    cfg = write_config()
    start_agent(procs, cfg, "quiet-1")
    done, _ = request(cfg, "quiet-1", "ping")
    assert done.returncode == 0 and done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("answered in "), done.stderr
    done, _ = request(cfg, "quiet-1", "ping", "--log-level", "info")
    assert done.returncode == 0 and "connected to broker" in done.stderr, done.stderr


def test_two_agents_with_one_id_back_off_instead_of_fighting(write_config, procs) -> None:
    """The agent whose session is taken over (MQTT 5 reason 142) says so once, with what to do, and
    backs off: no stream of reconnects and lost connections."""
    cfg = write_config()
    start_agent(procs, cfg, "twin")
    procs.start("twin-2", "fleet-agent", "--config", str(cfg), "--id", "twin")
    wait_for(lambda: "took the session over" in procs.log("twin") + procs.log("twin-2"), 15,
             what="a twin to report the takeover")
    time.sleep(6)  # two agents fighting over an id swap about once a second
    logs = procs.log("twin") + procs.log("twin-2")
    assert logs.count("took the session over") == 1, logs
    assert "give each client its own id" in logs and "agent.id" in logs
    # Mosquitto 2.0.11 closes the older connection without a DISCONNECT 142: the link takes a second
    # loss within seconds of connecting for a takeover, so a few warnings come first, not dozens
    assert logs.count("lost connection") <= SHORT_LIVED_IN_A_ROW * 2, logs


def test_reason_142_is_reported_as_a_takeover_with_a_long_backoff(caplog) -> None:
    """A DISCONNECT with reason 142 (session taken over), as EMQX, HiveMQ and newer Mosquitto send:
    one error line saying what to do, and a reconnect delay of at least half a minute."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from fleet_common.config import MqttConfig
    from fleet_common.link import TAKEOVER_BACKOFF_S, Link

    link = Link(MqttConfig(), "twin-142")
    link.connected.set()
    with caplog.at_level("INFO", logger="fleet.link"):
        link._on_disconnect(link.client, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=142), None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "took the session over (MQTT 5 reason 142)" in lines[0], lines
    assert "'twin-142'" in lines[0] and "its own id" in lines[0] and link.takeovers == 1
    assert link.client._reconnect_min_delay >= TAKEOVER_BACKOFF_S[0] / 2


def up(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run("fleetctl", "up", "--config", str(cfg), *args, cwd=cfg.parent, timeout=timeout)


def test_up_refuses_a_second_stack_whose_agent_is_online(write_config, procs) -> None:
    """`fleetctl up` with the id of an agent already online at the broker: one line, exit 1, nothing started."""
    start_agent(procs, write_config("first"), "dup-host")
    done = up(write_config("second", agent={"id": "dup-host"}))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not starting a second stack: agent 'dup-host' is already online" in done.stdout, done.stdout
    assert "persister |" not in done.stdout and "agent      |" not in done.stdout, done.stdout


def test_up_refuses_a_second_stack_while_its_persister_runs(write_config, procs) -> None:
    """`fleetctl up` while a persister with the same heartbeat file runs: one line naming it, exit 1."""
    cfg = write_config(agent={"id": "solo-host"})
    procs.start_persister(cfg)
    done = up(cfg)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not starting a second stack: a persister is already running on this host (pid " in done.stdout, \
        done.stdout


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["history", "web-01", "cpu"]])
def test_read_only_commands_never_create_a_store(tmp_path, argv) -> None:
    """With no SQLite file where the config points, a reader says which file it looked for, exits
    non-zero and creates nothing (the file, its folder)."""
    done = run("fleetctl", *argv, cwd=tmp_path)  # no config.yaml: the default data/fleet.db
    assert done.returncode != 0, done.stdout
    assert f"no SQLite store at {tmp_path / 'data' / 'fleet.db'}" in done.stderr, done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_read_only_commands_name_the_store_they_read(tmp_path) -> None:
    """status and history end their tables with the store they read; with --json it is on stderr."""
    cfg = store_config(tmp_path)
    says = f"store: sqlite {tmp_path / 'fleet.db'}"
    for argv in (["status"], ["history", "web-01", "cpu"]):
        done = run("fleetctl", *argv, "--config", str(cfg), cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.rstrip().endswith(says), (argv, done.stdout, done.stderr)
        done = run("fleetctl", *argv, "--json", "--config", str(cfg), cwd=tmp_path)
        assert done.returncode == 0 and json.loads(done.stdout) == [], (argv, done.stdout)
        assert f"fleetctl: read {says}" in done.stderr, (argv, done.stderr)


@pytest.mark.slow  # a whole stack, with no broker fixture to mark it
def test_up_stops_the_broker_last_on_ctrl_c(tmp_path) -> None:
    """Ctrl-C at a terminal (SIGINT to the whole process group) stops the agent, controller and
    persister before the embedded broker: none of them logs a lost connection or a reconnect."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "mqtt": {"port": port, "topic_prefix": "upstop"},
        "agent": {"id": "stop-host", "outbox_path": str(tmp_path / "outbox.db")},
        "persister": {"sqlite_path": str(tmp_path / "fleet.db")},
    }))
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "fleetctl"), "up", "--config", str(cfg),
                                 "--data-dir", str(tmp_path / "data"),
                                 "--broker-config", str(ROOT / "broker_config" / "dev.conf")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
        try:
            wait_for(lambda: "agents: 1 online of 1" in log.read_text(), 40, interval_s=0.3,
                     what="the stack to be up with its agent online")
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "fleetctl   | stopping" in text, text[-3000:]
    after = text[text.index("fleetctl   | stopping"):]
    for noise in ("lost connection", "reconnecting", "cannot reach broker"):
        assert noise not in after, after
    assert not port_open("127.0.0.1", port), "the embedded broker is still running"
