"""`fleetctl up`: the whole stack on this machine with embedded defaults.

Mosquitto (our own from broker_config/, unless one already answers at the
configured address), the persister on SQLite, the controller and one local agent,
each a child process whose log lines are shown with its name; a short summary of
what is stored is printed whenever it changes. Ctrl-C stops everything.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import IO, Any, Callable

from fleet_common import health
from fleet_common.config import Config
from fleet_common.errors import FleetError
from fleet_common.health import wait_ready
from fleet_common.link import Link
from fleet_common.messages import Status, parse_status
from fleet_common.topics import sanitise_agent_id

from .broker import EmbeddedBroker, port_open, stock_limits_warning
from .views import summary_line

BIN = Path(sys.executable).parent
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
READY_TIMEOUT_S = 30.0  # a persister on MongoDB waits for its server; past this the agent starts anyway


def running_persister(cfg: Config) -> str | None:
    """Which persister already runs here with this config's heartbeat file, or None: a fresh
    heartbeat whose process is alive. Two on one host share the default client id
    (persister-<host>) and would take the session from each other."""
    beat = health.read_beat(cfg.persister.heartbeat.path)
    if beat is None or health.check(cfg.persister.heartbeat.path)[1].startswith(("stale", "unreadable")):
        return None
    pid = beat.get("pid")
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except (TypeError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"a persister is already running on this host (pid {pid}, heartbeat {cfg.persister.heartbeat.path})"


def online_agent(cfg: Config, agent_id: str, timeout_s: float = 3.0) -> str | None:
    """Why agent `agent_id` counts as online at the broker (its retained status), or None."""
    topics = cfg.mqtt.topics()
    statuses: list[Status] = []
    barrier: list[int] = []
    done = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            statuses.append(parse_status(bytes(msg.payload), topics.parse(msg.topic)))
        except FleetError:
            pass

    def on_subscribe(client: Any, userdata: Any, mid: int, *_: Any) -> None:
        if mid in barrier:  # callbacks share paho's network thread: on_connect has run
            done.set()

    def on_connect(client: Any, session_present: bool) -> None:
        client.subscribe(topics.status(agent_id), qos=0)
        _, mid = client.subscribe(topics.status(agent_id), qos=0)  # its SUBACK comes after the retained status
        barrier.append(mid)

    quiet = logging.getLogger("fleetctl.up.probe")
    quiet.setLevel(logging.WARNING)  # its connect and disconnect are no news
    link = Link(cfg.mqtt, f"fleetctl-up-{uuid.uuid4().hex[:12]}", logger=quiet)
    link.client.on_message = on_message
    link.client.on_subscribe = on_subscribe
    link.on_connect_hooks.append(on_connect)
    with link:
        if not link.wait_connected(timeout_s):
            return None  # the services will say why they cannot connect
        done.wait(timeout_s)
    online = [s for s in statuses if s.online]
    if not online:
        return None
    return f"agent {agent_id!r} is already online at the broker at {link.where} (since {online[-1].ts})"


def find_broker_template(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [
        Path.cwd() / "broker_config" / "dev.conf",
        Path(__file__).resolve().parents[3] / "broker_config" / "dev.conf",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FleetError(f"no broker config found (looked for {', '.join(str(p) for p in candidates)}); "
                     "pass --broker-config PATH")


class Child:
    """One service process whose output is echoed line by line with its name in front."""

    def __init__(self, name: str, argv: list[str], out: IO[str], watch: Callable[[str], None] | None = None):
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True)
        self._out, self._watch = out, watch
        self._thread = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.write(f"{self.name:<10} | {line}")
            self._out.flush()
            if self._watch:
                self._watch(line)

    def wait_ready(self, heartbeat_path: str, timeout_s: float, stop: threading.Event) -> bool:
        """Until its heartbeat says it is subscribed; False if it exits, `stop` is set or time runs out."""
        return wait_ready(heartbeat_path, self.proc.pid, timeout_s,
                          alive=lambda: self.proc.poll() is None and not stop.is_set())

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(2)


def run_stack(cfg: Config, config_path: str | None, stop: threading.Event, *,
              broker_config: str | None = None, data_dir: str = "data",
              extra_args: list[str] | None = None, summary_every_s: float = 3.0,
              out: IO[str] = sys.stdout) -> int:
    broker: EmbeddedBroker | None = None
    children: list[Child] = []
    host, port = cfg.mqtt.host, cfg.mqtt.port
    agent_id = cfg.agent.id or sanitise_agent_id()

    def say(text: str) -> None:
        out.write(f"{'fleetctl':<10} | {text}\n")
        out.flush()

    try:
        if port_open(host, port):
            say(f"using the MQTT broker already answering at {host}:{port}")
            warning = stock_limits_warning(cfg.mqtt)
            if warning:
                say(warning)
        elif host in LOCAL_HOSTS:
            template = find_broker_template(broker_config)
            broker_log = Path(data_dir) / "mosquitto.log"
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            # its own session, as the services have: Ctrl-C reaches only us, and we stop it last
            broker = EmbeddedBroker(template, port, Path(data_dir) / "mosquitto",
                                    log=open(broker_log, "ab"), own_session=True)
            broker.start()
            say(f"started Mosquitto on 127.0.0.1:{port} (config {template}, log {broker_log})")
        else:
            raise FleetError(f"no MQTT broker answers at {host}:{port}; start it, or set mqtt.host to "
                             "localhost to let fleetctl start one")
        clash = running_persister(cfg) or (online_agent(cfg, agent_id) if broker is None else None)
        if clash:
            say(f"not starting a second stack: {clash}. Stop the other one, or give this stack its own ids "
                "(agent.id or FLEET_AGENT_ID, persister.client_id) and heartbeat and data paths")
            return 1
        args = (["--config", config_path] if config_path else []) + (extra_args or [])
        persister = Child("persister", [str(BIN / "fleet-persister"), *args], out)
        children.append(persister)
        controller = Child("controller", [str(BIN / "fleet-controller"), *args], out)
        children.append(controller)
        # The agent's first birth must reach a subscribed controller, which then asks it for every
        # type at once (otherwise slow types, os_info hourly, would wait for their phase), and a
        # subscribed persister, which stores the requests and answers.
        for child, heartbeat in ((persister, cfg.persister.heartbeat.path),
                                 (controller, cfg.controller.heartbeat.path)):
            if not child.wait_ready(heartbeat, READY_TIMEOUT_S, stop):
                say(f"{child.name} did not say it was ready (subscribed) within {READY_TIMEOUT_S:.0f} s "
                    f"(heartbeat {heartbeat}); starting the agent anyway")
        children.append(Child("agent", [str(BIN / "fleet-agent"), *args], out))
        say("stack is up; press Ctrl-C to stop. Watch the traffic with: "
            f"mosquitto_sub -h {host} -p {port} -v -t '{cfg.mqtt.topic_prefix}/#'")
        last = ""
        while not stop.wait(summary_every_s):
            for child in children:
                if child.proc.poll() is not None:
                    say(f"{child.name} exited with code {child.proc.returncode}; stopping the stack")
                    return 1
            line = summary_line(cfg)
            if line and line != last:
                say(line)
                last = line
        say("stopping")
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        if broker is not None:
            broker.stop()
            if broker.log:
                broker.log.close()
