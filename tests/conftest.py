"""Shared fixtures: a real Mosquitto per test on a free port, a unique topic prefix,
config files, and real service processes that are stopped (and their logs shown) at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from fleet_common import compat
from fleet_common.config import load_config
from fleet_common.health import wait_ready
from fleetctl.broker import EmbeddedBroker, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
DEV_CONF = ROOT / "broker_config" / "dev.conf"
BIN = Path(sys.executable).parent


# Fixtures that start real processes or a broker: a test that uses one is `slow`, so that
# `make test-fast` (-m "not slow") runs the unit and contract tests alone.
REAL_PARTS = {"broker", "procs", "write_config", "secure", "stack", "fbroker"}


def pytest_configure(config: Any) -> None:
    # In-process clients (test_link, test_security, fake fleets) run on the paho the services run;
    # tests/test_compat.py checks, in subprocesses, what a program that never calls it gets.
    compat.apply()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        if REAL_PARTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config: Any) -> list[str]:
    uri = os.environ.get("FLEET_TEST_MONGODB_URI")
    which = f"a real MongoDB server at {uri}" if uri else "mongomock (FLEET_TEST_MONGODB_URI is not set)"
    lines = [f"MongoDB store tests run against {which}", f"mosquitto: {find_mosquitto()}"]
    if os.environ.get("FLEET_TEST_FAST"):
        lines.append("FLEET_TEST_FAST is set: property tests try a quarter of their examples (make test tries all)")
    return lines


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.1,
             what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail the test naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def mongomock_accepts_sort() -> Iterator[None]:
    """pymongo >= 4.11 passes `sort` to every bulk update; mongomock 4.3 does not know it yet."""
    import mongomock

    builder: Any = mongomock.collection.BulkOperationBuilder
    original = builder.add_update

    def add_update(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    builder.add_update = add_update
    yield
    builder.add_update = original


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; run 'make test', which installs it")
    log = open(tmp_path / "mosquitto.log", "wb")
    b = EmbeddedBroker(DEV_CONF, free_port(), tmp_path / "broker", log=log)
    b.start()
    yield b
    b.stop()
    log.close()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def config_file(tmp_path: Path, name: str, port: int, prefix: str, **sections: dict[str, Any]) -> Path:
    """A config file for a test broker on `port`: every path under tmp_path, quick timings, debug logs."""
    data: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 2},
        "persister": {"sqlite_path": str(tmp_path / "fleet.db"), "batch_wait_s": 0.05,
                      "sweep_interval_s": 0.5, "expire_grace_s": 0.5,
                      "heartbeat_path": str(tmp_path / f"{name}-persister.heartbeat.json")},
        "controller": {"heartbeat_path": str(tmp_path / f"{name}-controller.heartbeat.json")},
        "agent": {"outbox_path": str(tmp_path / f"{name}-outbox.db"),
                  "heartbeat_path": str(tmp_path / f"{name}-agent.heartbeat.json")},
        "log": {"level": "debug"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def write_config(tmp_path: Path, broker: EmbeddedBroker, prefix: str) -> Callable[..., Path]:
    """write_config(name, agent={...}, ...) -> path of a config file for this test's broker."""

    def write(name: str = "config", **sections: dict[str, Any]) -> Path:
        return config_file(tmp_path, name, broker.port, prefix, **sections)

    return write


class Procs:
    """Real service processes, each logging to its own file, all stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}.log", "ab")
        # cwd: relative defaults (data/..., heartbeat files) land in the test's folder, not the checkout
        proc = subprocess.Popen([str(BIN / command), *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=self.tmp_path)
        self.procs[name] = proc
        return proc

    def start_persister(self, config: Path, name: str = "persister", *args: str) -> subprocess.Popen[bytes]:
        """fleet-persister, once its subscriptions are active: what is published before that is
        not in its (new) session, and a request the controller sends then is never stored."""
        proc = self.start(name, "fleet-persister", "--config", str(config), *args)
        self.wait_ready(name, "persister")
        return proc

    def start_controller(self, config: Path, name: str = "controller") -> subprocess.Popen[bytes]:
        """fleet-controller, once it watches agent status: a birth from then on is news to it, and
        it asks that agent for every type at once."""
        proc = self.start(name, "fleet-controller", "--config", str(config))
        self.wait_ready(name, "controller")
        return proc

    def wait_ready(self, name: str, section: str, timeout_s: float = 20.0) -> None:
        """Until process `name` (started with --config) says in the heartbeat file of its config's
        `section` that its subscriptions are acknowledged."""
        proc = self.procs[name]
        argv = [str(a) for a in proc.args]
        config = argv[argv.index("--config") + 1]
        heartbeat = Path(getattr(load_config(config, env={}), section).heartbeat.path).expanduser()
        path = heartbeat if heartbeat.is_absolute() else self.tmp_path / heartbeat  # it runs in tmp_path
        if not wait_ready(str(path), proc.pid, timeout_s, alive=lambda: proc.poll() is None):
            raise AssertionError(f"{name} did not say it was ready in {path} within {timeout_s:.0f} s "
                                 f"(exit code {proc.poll()}):\n{self.log(name)[-3000:]}")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for name in self.procs:
            text = self.log(name)
            print(f"----- {name} log (last 60 lines) -----")
            print("\n".join(text.splitlines()[-60:]))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def start_sim(procs: Procs, tmp_path: Path, cfg: Path, name: str, agents: int, *args: str) -> None:
    """`agents` simulated agents named <name>-1 ... (fleet-sim, with `args`), waited for until all
    are connected."""
    stats = tmp_path / f"{name}.json"
    procs.start(name, "fleet-sim", "--config", str(cfg), "--agents", str(agents), "--id-prefix", name,
                "--stats-file", str(stats), "--stats-every-s", "0.3", *args)

    def connected() -> bool:
        try:
            return json.loads(stats.read_text()).get("all_connected_after_s") is not None
        except (OSError, ValueError):
            return False

    wait_for(connected, what=f"simulated agents {name} to connect")
