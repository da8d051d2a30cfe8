"""What every bench stage needs: one Mosquitto, config files, service processes with their
logs, CPU and memory readings, observers of the traffic, and percentiles."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common.link import no_delay
from fleet_common.timefmt import parse_iso
from fleetctl.broker import EmbeddedBroker, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent
DEV_CONF = ROOT / "broker_config" / "dev.conf"
ALL_60 = {t: 60 for t in ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> dict[str, Any]:
    mosq = find_mosquitto()
    version = ""
    if mosq:
        out = subprocess.run([mosq, "-h"], capture_output=True, text=True)
        version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    return {"cores": os.cpu_count(), "python": platform.python_version(), "mosquitto": version,
            "paho_mqtt": _dist_version("paho-mqtt"), "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class Proc:
    """A service process with its log file; CPU time and RSS read through psutil."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.popen.pid)
        self.peak_rss = 0

    def _children(self) -> list[psutil.Process]:
        try:
            return list(self.ps.children(recursive=True))
        except psutil.Error:
            return []

    def cpu_s(self) -> float:
        """CPU of the process and of its child processes (the persister's parse workers)."""
        t = self.ps.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for c in self._children():
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        """RSS of the process and of its child processes."""
        rss = int(self.ps.memory_info().rss)
        for c in self._children():
            try:
                rss += int(c.memory_info().rss)
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()
        return self.popen.returncode

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


class CpuWindow:
    """CPU seconds and peak RSS of some processes between start() and stop()."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.t0 = 0.0
        self.cpu0: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> CpuWindow:
        self.t0 = time.monotonic()
        self.cpu0 = {n: p.cpu_s() for n, p in self.procs.items()}
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            for n, p in self.procs.items():
                try:
                    self.peak[n] = max(self.peak.get(n, 0), p.rss())
                except psutil.Error:
                    pass

    def stop(self) -> dict[str, dict[str, float]]:
        elapsed = time.monotonic() - self.t0
        self._stop.set()
        out = {}
        for n, p in self.procs.items():
            cpu = p.cpu_s() - self.cpu0[n]
            out[n] = {"cpu_s": round(cpu, 2), "cpu_pct_of_core": round(100 * cpu / elapsed, 1),
                      "peak_rss_mb": round(max(self.peak.get(n, 0), p.rss()) / 2**20, 1)}
        return out


@dataclass
class Bench:
    """One bench invocation: a run folder, one broker shared by every stage."""

    run_dir: Path
    broker: EmbeddedBroker | None = None
    broker_proc: psutil.Process | None = None
    procs: list[Proc] = field(default_factory=list)

    def start(self, save_every_change: bool = False) -> Bench:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        raise_nofile()  # Mosquitto inherits it: 10,000 agents are 10,000 sockets
        text = DEV_CONF.read_text(encoding="utf-8")
        if not save_every_change:
            # Persistence on, saved periodically as prod.conf does. dev.conf saves after every
            # change, which rewrites the whole file each time and caps Mosquitto 2.0.11 at about
            # 2,000 msg/s here (docs/sizing.md); --broker-save-every-change measures that.
            text = re.sub(r"(?m)^autosave_on_changes\s+true\s*\n", "", text)
            text = re.sub(r"(?m)^autosave_interval\s+\d+", "autosave_interval 10", text)
        # the cold-start stage reads the broker's stored-message count from $SYS, every second
        template = self.run_dir / "bench.conf"
        template.write_text(text + "\nsys_interval 1\n")
        self.broker = EmbeddedBroker(template, free_port(), self.run_dir / "broker",
                                     log=open(self.run_dir / "mosquitto.log", "ab"))
        self.broker.start()
        assert self.broker.proc is not None
        self.broker_proc = psutil.Process(self.broker.proc.pid)
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        if self.broker is not None:
            self.broker.stop()

    @property
    def port(self) -> int:
        assert self.broker is not None
        return int(self.broker.port)

    def config(self, name: str, prefix: str, **sections: dict[str, Any]) -> Path:
        data: dict[str, Any] = {"mqtt": {"host": "127.0.0.1", "port": self.port, "topic_prefix": prefix,
                                         "reconnect_min_s": 0.2, "reconnect_max_s": 2},
                                "persister": {"sqlite_path": str(self.run_dir / f"{prefix}.db")},
                                "log": {"level": "info"}}
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start_proc(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.run_dir / f"{name}.log")
        self.procs.append(p)
        return p

    def service(self, name: str, command: str, config: Path, *args: str) -> Proc:
        return self.start_proc(name, [str(BIN / command), "--config", str(config), *args])

    def python(self, name: str, script: str, *args: str) -> Proc:
        return self.start_proc(name, [sys.executable, str(BENCH / script), *args])

    def broker_cpu_s(self) -> float:
        assert self.broker_proc is not None
        t = self.broker_proc.cpu_times()
        return float(t.user + t.system)

    def broker_rss_mb(self) -> float:
        assert self.broker_proc is not None
        return round(float(self.broker_proc.memory_info().rss) / 2**20, 1)


def client(client_id: str = "", session_expiry_s: int = 0) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def connect(c: mqtt.Client, port: int, session_expiry_s: int = 0) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    c.connect("127.0.0.1", port, keepalive=60, clean_start=session_expiry_s == 0, properties=props)
    no_delay(c)  # as every client of the system does


class Observer:
    """Records every message on one topic filter with its arrival time (for requests: the
    ground truth of what was dispatched, independent of the store)."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[tuple[float, bytes]] = []
        self.subscribed = threading.Event()
        self.c = client()
        self.c.on_message = lambda cl, ud, msg: self.messages.append((time.time(), bytes(msg.payload)))
        self.c.on_connect = lambda cl, *a: cl.subscribe(topic_filter, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        connect(self.c, port)
        self.c.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError(f"observer could not subscribe to {topic_filter}")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def requests(self) -> list[tuple[str, float, float, float]]:
        """(id, issued_at, expires_at, arrival) of each request observed."""
        out = []
        for arrived, payload in self.messages:
            obj = json.loads(payload)
            out.append((obj["id"], parse_iso(obj["issued_at"]), parse_iso(obj["expires_at"]), arrived))
        return out


def read_commits(path: Path) -> tuple[dict[str, float], list[float]]:
    """The probe persister's log: request id -> first commit time, and its connection times."""
    commits: dict[str, float] = {}
    connected: list[float] = []
    if not path.exists():
        return commits, connected
    with open(path, encoding="utf-8") as f:
        for line in f:
            ts, _, what = line.rstrip("\n").partition(" ")
            if what == "=connected":
                connected.append(float(ts))
            elif what not in commits:
                commits[what] = float(ts)
    return commits, connected


def count_rows(db: Path, sql: str = "SELECT COUNT(*) FROM requests") -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def wait_until(predicate: Any, timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


def sim_stats(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
