"""A fleet of simulated agents in one process: connect them at a bounded pace, keep them
connected, answer requests, and say goodbye on the way out within a bounded time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_common.config import MqttConfig
from fleet_common.errors import FleetError
from fleet_common.topics import Topics, check_agent_id

from .agent import SimAgent
from .glue import LoopGlue
from .synthetic import DEFAULT_PROCESSES, TYPES

log = logging.getLogger("fleet.sim")

FDS_PER_PROCESS = 64  # files the process needs besides one socket per agent


class SimError(FleetError):
    """The simulator cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SimSettings:
    agents: int = 10
    id_prefix: str = "sim"
    types: tuple[str, ...] = tuple(TYPES)
    processes: int = DEFAULT_PROCESSES
    session_expiry_s: int = 0
    keepalive_s: int = 60
    connect_concurrency: int = 100
    connect_timeout_s: float = 15.0
    reconnect_max_s: float = 10.0
    stop_grace_s: float = 15.0
    stats_every_s: float = 10.0
    stats_file: str | None = None
    # Every agent's labels, and labels whose value cycles through a list by agent number:
    # (("role", ("web", "db")),) gives sim-1 role=db, sim-2 role=web, ...
    labels: tuple[tuple[str, str], ...] = ()
    label_cycle: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def labels_of(self, number: int) -> dict[str, str] | None:
        """The labels of agent `number` (1-based, as in its id), or None when it has none."""
        out = dict(self.labels)
        out.update((key, values[number % len(values)]) for key, values in self.label_cycle if values)
        return out or None

    def agent_ids(self) -> list[str]:
        width = len(str(self.agents))
        return [check_agent_id(f"{self.id_prefix}-{i:0{width}d}") for i in range(1, self.agents + 1)]


@dataclass
class SimStats:
    agents: int = 0
    connected: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    received: int = 0
    answered: int = 0
    ok: int = 0
    dropped: int = 0
    bytes_out: int = 0
    all_connected_after_s: float | None = None
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; fail with advice if that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        raise SimError(f"{needed} open files are needed but the hard limit is {want}; raise it "
                       f"(ulimit -Hn, or LimitNOFILE= in a systemd unit) or simulate fewer agents")
    return want


class Fleet:
    """Fleet(mqtt_cfg, settings); `await fleet.run(stop)` serves until `stop` is set."""

    def __init__(self, mqtt_cfg: MqttConfig, settings: SimSettings) -> None:
        unknown = sorted(set(settings.types) - set(TYPES))
        if unknown:
            raise SimError(f"unknown type(s) {', '.join(unknown)}; the simulator answers {', '.join(TYPES)}")
        if settings.agents < 1:
            raise SimError("--agents must be at least 1")
        self.mqtt, self.settings = mqtt_cfg, settings
        self.topics = Topics(mqtt_cfg.topic_prefix)
        self.stats = SimStats(agents=settings.agents)
        self.loop = asyncio.get_running_loop()
        self.glue = LoopGlue(self.loop)
        self.agents: list[SimAgent] = []
        self.running = False
        self._retry: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> SimStats:
        raise_fd_limit(self.settings.agents + FDS_PER_PROCESS)
        self.running = True
        tasks = [asyncio.create_task(self.glue.housekeeping(), name="sim-housekeeping"),
                 asyncio.create_task(self._report(stop), name="sim-stats")]
        try:
            self.agents = [SimAgent(self, agent_id, self.settings.labels_of(number))
                           for number, agent_id in enumerate(self.settings.agent_ids(), start=1)]
            connecting = asyncio.create_task(self._connect_all(stop), name="sim-connect")
            await stop.wait()
            connecting.cancel()
        finally:
            self.running = False
            await self._goodbye()
            for task in tasks:
                task.cancel()
            self._write_stats()
        return self.stats

    async def _connect_all(self, stop: asyncio.Event) -> None:
        """At most connect_concurrency CONNECTs waiting for their CONNACK, so the broker's accept
        queue never overflows (a dropped SYN would block this loop for a second)."""
        started = time.monotonic()
        gate = asyncio.Semaphore(self.settings.connect_concurrency)

        async def one(agent: SimAgent) -> None:
            try:
                ok = await asyncio.wait_for(asyncio.shield(agent.connect()), self.settings.connect_timeout_s)
            except asyncio.TimeoutError:
                ok = False
            finally:
                gate.release()
            if not ok:
                self.stats.connect_failures += 1
                self.lost(agent)

        pending = []
        for agent in self.agents:
            if stop.is_set():
                return
            await gate.acquire()
            pending.append(asyncio.create_task(one(agent), name=f"connect-{agent.id}"))
        await asyncio.gather(*pending)
        while self.stats.connected < self.settings.agents and not stop.is_set():
            await asyncio.sleep(0.1)
        self.stats.all_connected_after_s = round(time.monotonic() - started, 2)
        log.info("all %d agents connected in %.1f s", self.settings.agents, self.stats.all_connected_after_s)
        self._write_stats()

    def lost(self, agent: SimAgent) -> None:
        """Reconnect a dropped agent after a jittered, doubling delay (as the real agent does)."""
        if not self.running:
            return
        attempt = self._retry.get(agent.id, 0)
        self._retry[agent.id] = attempt + 1
        delay = random.uniform(0.5, 1.0) * min(self.settings.reconnect_max_s, 0.5 * 2 ** min(attempt, 10))
        self.loop.call_later(delay, self._reconnect, agent)

    def _reconnect(self, agent: SimAgent) -> None:
        if self.running and not agent.connected:
            future = agent.connect()
            future.add_done_callback(lambda f: self._retry.pop(agent.id, None) if f.result() else None)

    async def _goodbye(self) -> None:
        """Offline status from every connected agent, then DISCONNECT; bounded by stop_grace_s."""
        deadline = time.monotonic() + self.settings.stop_grace_s
        for agent in self.agents:
            agent.say_goodbye()
        while any(a.client.want_write() for a in self.agents if a.connected) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for agent in self.agents:
            if agent.connected:
                agent.disconnect()
        while self.glue.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("fleet stopped: %s", ", ".join(f"{k} {v}" for k, v in self.stats.as_dict().items()
                                                if k not in ("started_at", "all_connected_after_s")))

    async def _report(self, stop: asyncio.Event) -> None:
        last = (time.monotonic(), 0)
        while not stop.is_set():
            await asyncio.sleep(self.settings.stats_every_s)
            now, answered = time.monotonic(), self.stats.answered
            rate = (answered - last[1]) / max(now - last[0], 1e-9)
            last = (now, answered)
            log.info("agents connected %d/%d; answered %d (%.0f/s); dropped %d; reconnects %d",
                     self.stats.connected, self.settings.agents, answered, rate, self.stats.dropped,
                     self.stats.reconnects)
            self._write_stats()

    def _write_stats(self) -> None:
        if self.settings.stats_file:
            path = Path(self.settings.stats_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.stats.as_dict()))
            tmp.replace(path)
