"""The fleet's newest values for Prometheus at /metrics (docs/prometheus.md): one exposition,
labelled per host, as Prometheus does not take pushes from agents.

A background thread reads the store every `dashboard.metrics_refresh_s` into `FleetValues`
and renders it through `FleetCollector`, a prometheus_client collector, into one page of text
(and its gzip form); a scrape is handed that page and never reads the store. A value older than
three intervals of its type (`controller.schedule`) at the time of the read is left out, not
shown stale: its series ends, which is what Prometheus's staleness and `absent()` understand.
With the endpoint off, `MetricsOff` is the null object.
"""

from __future__ import annotations

import gzip
import hmac
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from fleet_common.config import Config, DashboardConfig
from fleet_common.timefmt import parse_iso
from fleet_store import AgentRecord, StoreReader

from .data import agent_state

log = logging.getLogger("fleet.dashboard")
STALE_INTERVALS = 3
INFO_LABELS = ("agent_id", "hostname", "platform", "agent_version")
# An agent label becomes a Prometheus label as it is (the contract's keys are [a-z][a-z0-9_]{0,31});
# one that would hide a fixed label, or that Prometheus could not take, is left out.
LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# A page older than this many refresh intervals is not served (503): Prometheus then reports the
# target down, rather than charting values the dashboard could no longer read.
SERVE_FOR_REFRESHES = 4


class Newest(NamedTuple):
    """An agent's newest answered request of one type."""

    agent_id: str
    type: str
    answered_at: str | None
    data: dict[str, Any] | None


def newest_answers(store: StoreReader, since_s: Mapping[str, float]) -> list[Newest]:
    """The newest ok answer of each agent for each type in `since_s`, answered since that time:
    the store's `latest` table, one indexed range a type. (`latest_all` would return every row,
    those of agents gone for months too, which is all the filter here would then drop.)"""
    return [Newest(r.agent_id, r.type, r.answered_at, r.data)
            for type_, since in since_s.items() for r in store.latest(type_, since, FIELDS.get(type_, ())).values()]


Labels = dict[str, str]


class Reading(NamedTuple):
    """One sample of an answer, but for its agent_id: e.g. fleet_disk_used_percent{mountpoint="/"} 91.5."""

    name: str
    labels: Labels
    value: float


class Current(NamedTuple):
    """An agent's newest answer of one type as the exposition keeps it: when it was answered, and the
    readings taken from it when it was read (not its data: a processes answer is large)."""

    agent_id: str
    type: str
    answered_s: float
    readings: list[Reading]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _cpu(data: dict[str, Any]) -> Iterator[tuple[str, Labels, Any]]:
    yield "fleet_cpu_percent", {}, data.get("percent")
    load = data.get("load_avg")
    for n, value in zip((1, 5, 15), load if isinstance(load, list) else []):
        yield f"fleet_load{n}", {}, value


def _memory(data: dict[str, Any]) -> Iterator[tuple[str, Labels, Any]]:
    virtual, swap = _dict(data.get("virtual")), _dict(data.get("swap"))
    yield "fleet_memory_used_percent", {}, virtual.get("percent")
    yield "fleet_memory_available_bytes", {}, virtual.get("available")
    yield "fleet_swap_used_percent", {}, swap.get("percent")


def _firsts(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """The first item of each name: one series per mount point or interface (bind mounts repeat one)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name = item.get(key)
        if isinstance(name, str) and name not in out:
            out[name] = item
    return out


def _disk(data: dict[str, Any]) -> Iterator[tuple[str, Labels, Any]]:
    for mount, part in _firsts(_items(data.get("partitions")), "mountpoint").items():
        yield "fleet_disk_used_percent", {"mountpoint": mount}, part.get("percent")
        yield "fleet_disk_free_bytes", {"mountpoint": mount}, part.get("free")


def _network(data: dict[str, Any]) -> Iterator[tuple[str, Labels, Any]]:
    for name, nic in _firsts(_items(data.get("interfaces")), "name").items():
        yield "fleet_network_receive_bytes_total", {"interface": name}, nic.get("bytes_recv")
        yield "fleet_network_transmit_bytes_total", {"interface": name}, nic.get("bytes_sent")


def _processes(data: dict[str, Any]) -> Iterator[tuple[str, Labels, Any]]:
    yield "fleet_process_count", {}, data.get("total")  # the list itself is only the top few


READERS = {"cpu": _cpu, "memory": _memory, "disk": _disk, "network": _network, "processes": _processes}
# What of each type's data the store hands over: of processes only the total (a fleet's processes
# answers are gigabytes, their totals kilobytes), of types no reader looks at nothing, of the rest
# all (they are small, and SQLite's JSON functions would round their floats to 15 digits).
FIELDS: dict[str, tuple[str, ...] | None] = {"processes": ("total",), **dict.fromkeys(READERS.keys() - {"processes"})}


def current(found: Newest) -> Current | None:
    """The readings of an answer; a reading sent as null (a platform without it) is none."""
    if found.answered_at is None:
        return None
    read = READERS.get(found.type)
    readings = [Reading(name, labels, float(value)) for name, labels, value in read(_dict(found.data))
                if _number(value) is not None] if read else []
    return Current(found.agent_id, found.type, parse_iso(found.answered_at), readings)


@dataclass(frozen=True)
class FleetValues:
    """What one scrape shows, read from the store at `taken_at`: every agent, and its answers
    that were current then (answered within three intervals of their type), by agent and type."""

    taken_at: float
    agents: list[AgentRecord]
    online: dict[str, bool]
    answers: dict[str, dict[str, Current]]
    answered_ratio: dict[str, float]


class StoreReads:
    """A refresh's reads of the store, each part only as often as it can usefully change: a type's
    newest answers every dashboard.metrics_refresh_s, or a quarter of the type's interval if that is
    longer (disk and processes every 75 s, os_info every 15 min on the default schedule: their
    answers come no oftener, and a processes answer is large); the answered ratio, over a window of
    minutes, once a minute. Whether an answer is current is judged at every refresh."""

    stats_every_s = 60.0

    def __init__(self, store: StoreReader, cfg: Config) -> None:
        self.store, self.cfg = store, cfg
        self._answers: dict[str, list[Current]] = {}
        self._read_at: dict[str, float] = {}
        self._ratio: dict[str, float] = {}

    def _due(self, part: str, every_s: float, now: float) -> bool:
        return now - self._read_at.get(part, -math.inf) >= every_s

    def values(self, now: float) -> FleetValues:
        schedule, refresh_s = self.cfg.controller.schedule, self.cfg.dashboard.metrics_refresh_s
        due = {type_: now - STALE_INTERVALS * interval_s for type_, interval_s in schedule.items()
               if self._due(type_, max(refresh_s, interval_s / 4), now)}
        if due:
            fresh: dict[str, list[Current]] = {type_: [] for type_ in due}
            for found in newest_answers(self.store, due):
                kept = current(found)
                if kept is not None:
                    fresh[found.type].append(kept)
            self._answers.update(fresh)
            self._read_at.update(dict.fromkeys(due, now))
        answers: dict[str, dict[str, Current]] = {}
        for type_, of_type in self._answers.items():
            oldest = now - STALE_INTERVALS * schedule.get(type_, 0)
            for kept in of_type:
                if kept.answered_s >= oldest:
                    answers.setdefault(kept.agent_id, {})[type_] = kept
        if self._due("stats", max(refresh_s, self.stats_every_s), now):
            stats = self.store.agent_stats(now - self.cfg.dashboard.stats_window_s)
            self._ratio = {agent_id: s.answered / s.issued for agent_id, s in stats.items() if s.issued}
            self._read_at["stats"] = now
        agents = self.store.agents()
        silent_after_s = self.cfg.dashboard.silent_after_s
        return FleetValues(taken_at=now, agents=agents,
                           online={a.agent_id: agent_state(a, now, silent_after_s) == "online" for a in agents},
                           answers=answers, answered_ratio=self._ratio)


def info_labels(agent: AgentRecord) -> Labels:
    labels = {"agent_id": agent.agent_id, "hostname": agent.hostname or "", "platform": agent.platform or "",
              "agent_version": agent.agent_version or ""}
    for key, value in sorted(agent.labels.items()):
        if LABEL_RE.match(key) and not key.startswith("__") and key not in INFO_LABELS:
            labels[key] = str(value)
    return labels


class Families:
    """The metric families of one scrape, each filled agent by agent."""

    def __init__(self) -> None:
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        self.online = gauge("fleet_agent_online", "1 if the agent is online: its last status said so and it "
                                                  "was heard from within dashboard.silent_after_s; else 0")
        self.info = gauge("fleet_agent_info", "Always 1: the agent's host name, platform, version and labels")
        self.age = gauge("fleet_answer_age_seconds", "Seconds since the newest answer of this type, at the "
                                                     "dashboard's last read of the store")
        self.ratio = gauge("fleet_requests_answered_ratio", "Share of the agent's requests answered, over "
                                                            "dashboard.stats_window_s")
        values: list[Metric] = [
            gauge("fleet_cpu_percent", "Busy share of all CPUs since the previous cpu request, in %"),
            *(gauge(f"fleet_load{n}", f"Load average over {n} minute(s)") for n in (1, 5, 15)),
            gauge("fleet_memory_used_percent", "Memory in use, in %"),
            gauge("fleet_memory_available_bytes", "Memory available to programs without swapping"),
            gauge("fleet_swap_used_percent", "Swap in use, in %"),
            gauge("fleet_disk_used_percent", "Used space of a mounted file system, in %"),
            gauge("fleet_disk_free_bytes", "Free space of a mounted file system"),
            counter("fleet_network_receive_bytes", "Bytes received by a network interface since boot"),
            counter("fleet_network_transmit_bytes", "Bytes sent by a network interface since boot"),
            gauge("fleet_process_count", "Processes on the host"),
        ]
        # by the name of their samples (a counter's end in _total)
        self.values: dict[str, Metric] = {f.name + ("_total" if f.type == "counter" else ""): f for f in values}

    def all(self) -> list[Metric]:
        return [self.online, self.info, *self.values.values(), self.age, self.ratio]

    def add_agent(self, agent: AgentRecord, values: FleetValues) -> None:
        """The agent's samples. They are made here rather than by add_metric, which costs twice as
        much a sample at fleet scale."""
        a = agent.agent_id
        self.online.samples.append(Sample("fleet_agent_online", {"agent_id": a}, 1.0 if values.online.get(a) else 0.0))
        self.info.samples.append(Sample("fleet_agent_info", info_labels(agent), 1.0))
        ratio = values.answered_ratio.get(a)
        if ratio is not None:
            self.ratio.samples.append(Sample("fleet_requests_answered_ratio", {"agent_id": a}, ratio))
        for type_, kept in sorted(values.answers.get(a, {}).items()):
            self.age.samples.append(Sample("fleet_answer_age_seconds", {"agent_id": a, "type": type_},
                                           max(0.0, values.taken_at - kept.answered_s)))
            for name, labels, value in kept.readings:
                self.values[name].samples.append(Sample(name, {"agent_id": a, **labels}, value))


class FleetCollector(Collector):
    """prometheus_client's view of the last `FleetValues`; collecting never reads the store."""

    def __init__(self) -> None:
        self.values: FleetValues | None = None

    def collect(self) -> Iterator[Metric]:
        values = self.values
        if values is None:
            return
        families = Families()
        for agent in values.agents:
            families.add_agent(agent, values)
        yield from families.all()


@dataclass(frozen=True)
class Page:
    """One rendering of the exposition, plain and gzipped, and what it took to make."""

    text: bytes
    gzipped: bytes
    taken_at: float
    read_s: float
    render_s: float


class Reply(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]


class Metrics(Protocol):
    enabled: bool

    def reply(self, authorization: str, accept_encoding: str) -> Reply: ...

    def run(self, stop: threading.Event) -> None: ...


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def serves_metrics(d: DashboardConfig) -> bool:
    """dashboard.metrics_enabled, where null means: when the dashboard listens on loopback only."""
    return is_loopback(d.host) if d.metrics_enabled is None else d.metrics_enabled


def authorised(authorization: str, token: str | None) -> bool:
    """No token configured, or `Bearer <token>` sent; compared in constant time."""
    if not token:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class Exposition:
    enabled = True

    def __init__(self, store: StoreReader, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.clock = cfg, clock
        self.reads = StoreReads(store, cfg)
        self.collector = FleetCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._page: Page | None = None
        self._lock = threading.Lock()
        self._failing = False  # the last refresh could not read the store

    def refresh(self) -> Page:
        """Read the store and render a new page: what the background thread does each interval."""
        with self._lock:
            return self._render()

    def _render(self) -> Page:
        started = time.perf_counter()
        values = self.reads.values(self.clock())
        read = time.perf_counter()
        self.collector.values = values
        text = generate_latest(self.registry)
        page = Page(text=text, gzipped=gzip.compress(text, compresslevel=5), taken_at=values.taken_at,
                    read_s=read - started, render_s=time.perf_counter() - read)
        self._page = page
        return page

    def page(self) -> Page:
        """The last page; a scrape before the first refresh has finished waits for it."""
        page = self._page
        if page is None:
            with self._lock:
                page = self._page or self._render()
        return page

    def reply(self, authorization: str, accept_encoding: str) -> Reply:
        if not authorised(authorization, self.cfg.dashboard.metrics_token):
            return Reply(401, b"/metrics needs the dashboard's metrics token: Authorization: Bearer <token>\n",
                         {"WWW-Authenticate": 'Bearer realm="fleet metrics"', "Content-Type": "text/plain"})
        try:
            page = self.page()
        except Exception as exc:  # the first read failed: no page yet
            return Reply(503, f"the dashboard cannot read the store: {type(exc).__name__}: {exc}\n".encode(),
                         {"Content-Type": "text/plain"})
        age_s = self.clock() - page.taken_at
        if self._failing and age_s > SERVE_FOR_REFRESHES * self.cfg.dashboard.metrics_refresh_s:
            return Reply(503, f"the dashboard has not read the store for {age_s:.0f} s; see its log\n".encode(),
                         {"Content-Type": "text/plain"})
        headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Vary": "Accept-Encoding"}
        if "gzip" in accept_encoding.lower():
            return Reply(200, page.gzipped, {**headers, "Content-Encoding": "gzip"})
        return Reply(200, page.text, headers)

    def try_refresh(self) -> bool:
        """refresh(), logging a failure (a busy or restarting store) instead of raising: the last page
        is served until a refresh succeeds, or until it is SERVE_FOR_REFRESHES intervals old."""
        try:
            page = self.refresh()
        except Exception:
            self._failing = True
            log.exception("cannot read the fleet's newest values from the store for /metrics")
            return False
        self._failing = False
        log.debug("metrics refreshed: read %.3f s, rendered %.3f s, %d bytes", page.read_s, page.render_s,
                  len(page.text))
        return True

    def run(self, stop: threading.Event) -> None:
        """Refresh until `stop` is set, each refresh dashboard.metrics_refresh_s after the last ended."""
        while not stop.is_set():
            self.try_refresh()
            stop.wait(self.cfg.dashboard.metrics_refresh_s)


class MetricsOff:
    """dashboard.metrics_enabled is false (or null on a dashboard beyond loopback): no /metrics."""

    enabled = False

    def reply(self, authorization: str, accept_encoding: str) -> Reply:
        return Reply(404, b"/metrics is off: set dashboard.metrics_enabled\n", {"Content-Type": "text/plain"})

    def run(self, stop: threading.Event) -> None:
        return None


def metrics_for(store: StoreReader, cfg: Config) -> Metrics:
    return Exposition(store, cfg) if serves_metrics(cfg.dashboard) else MetricsOff()


def metric_names(families: Iterable[Metric]) -> set[str]:
    """The sample names a scrape can hold (a counter's with its `_total`): what dashboards may query."""
    names = set()
    for family in families:
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def exposed_names() -> set[str]:
    return metric_names(Families().all())
