"""Helpers for the fault-injection tests: the background load, a TCP proxy that can cut or
filter one client's link, a request publisher, and what was produced versus stored."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from conftest import DEV_CONF, Procs, config_file
from helpers import rows
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import Request, Topics, iso
from fleetctl.broker import EmbeddedBroker, free_port

LOAD = Path(__file__).resolve().parent / "load.py"
LOAD_RATE = 200  # request + response pairs per second


def start_broker(tmp_path: Path, extra_conf: str = "", port: int | None = None) -> EmbeddedBroker:
    """A Mosquitto from dev.conf plus `extra_conf` lines (later settings win)."""
    template = tmp_path / "broker.conf.template"
    template.write_text(DEV_CONF.read_text() + extra_conf)
    log = open(tmp_path / "mosquitto.log", "ab")
    return EmbeddedBroker(template, port or free_port(), tmp_path / "broker", log=log).start()


def write_config(tmp_path: Path, name: str, port: int, prefix: str, **sections: dict[str, Any]) -> Path:
    return config_file(tmp_path, name, port, prefix, **sections)


def new_prefix() -> str:
    return "f" + uuid.uuid4().hex[:10]


class Load:
    """tests/faults/load.py as a process: pairs at LOAD_RATE per second, ids in a file."""

    def __init__(self, tmp_path: Path, port: int, prefix: str, name: str = "load", twice: bool = False) -> None:
        self.out = tmp_path / f"{name}-ids.txt"
        self.log = open(tmp_path / f"{name}.log", "ab")
        args = [sys.executable, str(LOAD), "--port", str(port), "--prefix", prefix, "--out", str(self.out),
                "--rate", str(LOAD_RATE)] + (["--twice"] if twice else [])
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def produced(self) -> list[str]:
        return self.out.read_text().split() if self.out.exists() else []

    def finish(self, timeout_s: float = 150) -> set[str]:
        """Stop producing, wait until the broker acknowledged everything; the produced ids."""
        self.proc.terminate()
        code = self.proc.wait(timeout_s)
        self.log.close()
        assert code == 0, f"load generator exited {code}: not everything was acknowledged by the broker"
        ids = self.produced()
        assert len(ids) == len(set(ids))
        return set(ids)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stored_answered(db: Path, like: str = "%") -> set[str]:
    """Ids whose response is stored (state ok)."""
    return {r["id"] for r in rows(db, "SELECT id FROM requests WHERE state = 'ok' AND id LIKE ?", like)}


def stored_pairs(db: Path) -> set[str]:
    """Ids of load pairs with both the request and the response stored."""
    return {r["id"] for r in rows(db, "SELECT id FROM requests WHERE state = 'ok' AND issued_at IS NOT NULL "
                                      "AND id LIKE 'ld%'")}


def assert_exactly_stored(db: Path, produced: set[str], timeout_s: float = 90) -> None:
    """Every produced pair ends as one stored record with its request and response, no more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stored_pairs(db) >= produced:
        time.sleep(0.5)
    got = stored_pairs(db)
    missing, extra = produced - got, got - produced
    assert not missing, f"{len(missing)} of {len(produced)} produced pairs never stored, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} stored pairs nobody produced, e.g. {sorted(extra)[:5]}"
    total = rows(db, "SELECT COUNT(*) n FROM requests WHERE id LIKE 'ld%'")[0]["n"]
    assert total == len(produced), f"{total} records for {len(produced)} produced pairs"
    assert rows(db, "SELECT COUNT(*) n FROM rejected")[0]["n"] == 0, rows(db, "SELECT * FROM rejected LIMIT 3")


def wait_persister_ready(procs: Procs, name: str, timeout_s: float = 30) -> None:
    """Until the persister's heartbeat says its subscriptions are acknowledged."""
    procs.wait_ready(name, "persister", timeout_s)


def answered_in_log(text: str) -> set[str]:
    """Ids the agent logged as answered (the debug line written after the outbox commit)."""
    return set(re.findall(r"answered \w+ request (\S+) on ", text))


class Requester:
    """Sends `ping` requests to one agent at `rate` per second, straight to the broker; records ids."""

    def __init__(self, port: int, prefix: str, agent_id: str, rate: float = 40) -> None:
        self.topic = Topics(prefix).request(agent_id, "ping")
        self.rate = rate
        self.sent: list[str] = []
        self._stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"req-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="requester", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n, started = 0, time.monotonic()
        while not self._stop.is_set():
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            id_ = f"rq{uuid.uuid4().hex[:8]}{n:06d}"
            now = time.time()
            req = Request(id=id_, type="ping", issued_at=iso(now), expires_at=iso(now + 3600))
            self.client.publish(self.topic, req.payload(), qos=1).wait_for_publish(10)
            self.sent.append(id_)
            n += 1

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(15)
        self.client.disconnect()
        self.client.loop_stop()
        return set(self.sent)


class Proxy:
    """A TCP proxy in front of the broker (or any TCP server: `host`) for one client. Modes: `pass`; `drop_publish`
    (the client's PUBLISH packets vanish, everything else flows: its answers are lost on
    the wire while it believes it is connected); `refuse` (no connection at all)."""

    def __init__(self, broker_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.broker_port, self.mode = host, broker_port, "pass"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.dropped = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def set_mode(self, mode: str, reset: bool = False) -> None:
        self.mode = mode
        if reset or mode == "refuse":
            with self._lock:
                for s in self.conns:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
                self.conns.clear()

    def close(self) -> None:
        self.set_mode("refuse")
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.host, self.broker_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _close(src, dst)

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        """Client to broker, packet by packet, so whole PUBLISH packets can be dropped."""
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    size = _packet_size(buf)
                    if size is None or len(buf) < size:
                        break
                    packet, buf = buf[:size], buf[size:]
                    if self.mode == "drop_publish" and packet[0] & 0xF0 == 0x30:
                        self.dropped += 1
                        continue
                    dst.sendall(packet)
        except OSError:
            pass
        _close(src, dst)


def _packet_size(buf: bytes) -> int | None:
    """Length of the MQTT packet at the start of buf (fixed header + remaining length), if known yet."""
    value, shift = 0, 0
    for i in range(1, min(len(buf), 5)):
        value += (buf[i] & 0x7F) << shift
        if not buf[i] & 0x80:
            return 1 + i + value
        shift += 7
    return None


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass
