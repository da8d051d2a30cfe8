"""Start and stop a Mosquitto of our own from broker_config/, for `fleetctl up` and the tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common.config import MqttConfig
from fleet_common.errors import FleetError

INSTALL_HINT = ("Mosquitto is not installed. Install it with 'sudo apt-get install mosquitto mosquitto-clients' "
                "(Debian/Ubuntu), 'sudo dnf install mosquitto' (Fedora) or 'brew install mosquitto' (macOS), "
                "or point mqtt.host/mqtt.port at a broker that is running.")


class BrokerError(FleetError):
    pass


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# What a persister needs the broker to let it hold unacknowledged (broker_config/*.conf say 3000).
WANTED_INFLIGHT = 1000


def receive_maximum(cfg: MqttConfig, timeout_s: float = 3.0) -> int | None:
    """The Receive Maximum a running broker announces in its CONNACK (Mosquitto: its
    max_inflight_messages, 20 unless configured); 65535 if it announces none (no limit), None if
    it could not be asked."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleetctl-probe-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls.enabled:
        client.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file)
    got: list[int] = []
    done = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            got.append(int(getattr(props, "ReceiveMaximum", 65535)))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=10)
    except (OSError, ValueError):
        return None
    client.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def stock_limits_warning(cfg: MqttConfig) -> str | None:
    """One line if the broker at cfg's address keeps Mosquitto's default limits, else None."""
    found = receive_maximum(cfg)
    if found is None or found >= WANTED_INFLIGHT:
        return None
    return (f"warning: the broker at {cfg.host}:{cfg.port} lets a client have {found} unacknowledged messages "
            "(Mosquitto's default max_inflight_messages is 20, with max_queued_messages 1000): enough for this "
            "host alone, but large fleets and fleet-sim need the limits of broker_config/dev.conf. Add "
            "'max_inflight_messages 3000', 'max_queued_messages 100000' and 'set_tcp_nodelay true' to its "
            "configuration and restart it, or stop it and 'make run' starts its own")


def render_config(template: Path, port: int, data_dir: Path, bind: str = "127.0.0.1") -> str:
    """The template with our port, our persistence folder, and (as root) `user root`, since
    Mosquitto otherwise drops to the 'mosquitto' user and cannot write our folder."""
    text = template.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^listener\s+\d+(\s+\S+)?\s*$", f"listener {port} {bind}", text, count=1)
    text = re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", text)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not re.search(r"(?m)^user\s", text):
        text += "\n# started by root for this user's own folder\nuser root\n"
    return text


class EmbeddedBroker:
    """A Mosquitto process on `port` with data under `data_dir`; a context manager."""

    def __init__(self, template: Path, port: int, data_dir: Path, log: IO[bytes] | None = None,
                 own_session: bool = False) -> None:
        """`own_session`: out of our process group, so a terminal's Ctrl-C (SIGINT to the whole
        foreground group) does not stop it before the clients we stop first (fleetctl up)."""
        self.template, self.port, self.data_dir, self.log = template, port, Path(data_dir), log
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.data_dir / "mosquitto.conf"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(render_config(self.template, self.port, self.data_dir.resolve()))
        self.proc = subprocess.Popen([exe, "-c", str(self.conf_path)], stdout=self.log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if self.log else subprocess.DEVNULL,
                                     start_new_session=self.own_session)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"Mosquitto exited at start (code {self.proc.returncode}); "
                                  f"config: {self.conf_path}")
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.05)
        raise BrokerError(f"Mosquitto did not open port {self.port} within {timeout_s:.0f} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
