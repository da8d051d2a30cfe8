"""`fleetctl up`: the whole stack on this machine with embedded defaults.

Mosquitto (our own from broker_config/, unless one already answers at the
configured address), the persister on SQLite, the controller and one local agent,
each a child process whose log lines are shown with its name; a short summary of
what is stored is printed whenever it changes. Ctrl-C stops everything.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable

from fleet_common.config import Config
from fleet_common.errors import FleetError
from fleet_common.health import wait_ready

from .broker import EmbeddedBroker, port_open, stock_limits_warning
from .views import summary_line

BIN = Path(sys.executable).parent
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
READY_TIMEOUT_S = 30.0  # a persister on MongoDB waits for its server; past this the agent starts anyway


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
            broker = EmbeddedBroker(template, port, Path(data_dir) / "mosquitto",
                                    log=open(broker_log, "ab"))
            broker.start()
            say(f"started Mosquitto on 127.0.0.1:{port} (config {template}, log {broker_log})")
        else:
            raise FleetError(f"no MQTT broker answers at {host}:{port}; start it, or set mqtt.host to "
                             "localhost to let fleetctl start one")
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
