"""What the pages show, read from the store: the fleet table (one snapshot shared by every
viewer for a moment), one agent's series and latest answers, and the dead letters."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from fleet_common.config import Config
from fleet_common.labels import Labels
from fleet_common.timefmt import parse_iso
from fleet_store import AgentRecord, RequestRecord, Stats, StoreReader, TrendRecord

from .query import choice, integer, label_selector, text

STATES = ("online", "silent", "offline")
FLEET_PARAMS = ("q", "state", "label", "sort", "dir", "page", "per")
SORT_KEYS = ("agent_id", "state", "last_seen", "answered", "latency", "cpu", "memory", "disk")
# Beyond a type's raw retention (persister.retention_s) a chart is drawn from the hourly trends.
RANGES_S = {"15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000, "90d": 7776000,
            "400d": 34560000}
MAX_POINTS = 10000


@dataclass(frozen=True)
class FleetRow:
    agent_id: str
    state: str
    last_seen: str
    hostname: str | None
    platform: str | None
    issued: int
    answered: int
    median_latency_ms: float | None
    cpu: float | None
    memory: float | None
    disk: float | None
    disk_mount: str | None
    labels: Labels = field(default_factory=dict)

    @property
    def answered_ratio(self) -> float | None:
        return self.answered / self.issued if self.issued else None


@dataclass(frozen=True)
class Snapshot:
    rows: list[FleetRow]
    agents: dict[str, AgentRecord]
    counts: dict[str, int]
    taken_at: float
    took_ms: float
    by_label: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # (key, value) -> indexes in rows

    def labelled(self, selector: Labels) -> list[FleetRow]:
        """The rows whose labels include every pair of `selector`, from the index: a label filter costs
        what it finds, not a pass over the fleet."""
        found = [self.by_label.get(pair, set()) for pair in selector.items()]
        return [self.rows[i] for i in set.intersection(*found)] if found else self.rows


@dataclass(frozen=True)
class FleetQuery:
    """What the fleet page asks for: filter text, state, labels, sort key and direction, page."""

    q: str = ""
    state: str = ""
    labels: Labels = field(default_factory=dict)
    sort: str = "agent_id"
    desc: bool = False
    page: int = 1
    per_page: int = 100

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> FleetQuery:
        """The query from `?q=&state=&label=&sort=&dir=&page=&per=`; a value it cannot use raises BadQuery."""
        return cls(q=text(args, "q", 100).strip(), state=choice(args, "state", ("", *STATES), ""),
                   labels=label_selector(args, "label"),
                   sort=choice(args, "sort", SORT_KEYS, "agent_id"),
                   desc=choice(args, "dir", ("asc", "desc"), "asc") == "desc",
                   page=integer(args, "page", 1, 1), per_page=integer(args, "per", 100, 10, 1000))

    @property
    def label_args(self) -> list[str]:
        """The label filter as its query values: ["role=web", "dc=ams"]."""
        return [f"{k}={v}" for k, v in self.labels.items()]


@dataclass(frozen=True)
class FleetPage:
    rows: list[FleetRow]
    matched: int
    pages: int
    query: FleetQuery
    snapshot: Snapshot


@dataclass
class Series:
    """Aligned columns for one chart: times (epoch seconds) and one list of values per line."""

    t: list[float] = field(default_factory=list)
    lines: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "lines": self.lines}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cpu_percent(data: dict[str, Any] | None) -> float | None:
    return _number((data or {}).get("percent"))


def memory_percent(data: dict[str, Any] | None) -> float | None:
    virtual = (data or {}).get("virtual")
    return _number(virtual.get("percent")) if isinstance(virtual, dict) else None


def fullest_disk(data: dict[str, Any] | None) -> tuple[float | None, str | None]:
    parts = [p for p in (data or {}).get("partitions") or [] if isinstance(p, dict) and _number(p.get("percent"))
             is not None]
    if not parts:
        return None, None
    full = max(parts, key=lambda p: float(p["percent"]))
    return float(full["percent"]), str(full.get("mountpoint") or full.get("device") or "?")


def agent_state(agent: AgentRecord, now_s: float, silent_after_s: float) -> str:
    """offline: its last status said so (clean stop or Last Will); silent: said online (or never said)
    but nothing heard from it for silent_after_s; online otherwise."""
    if agent.online is False:
        return "offline"
    return "silent" if now_s - parse_iso(agent.last_seen) > silent_after_s else "online"


class Fleet:
    """The dashboard's reads. The fleet snapshot is shared by every viewer: the first page waits
    for it; after that a page older than `max_age_s` is served as it is while one background
    thread reads a new one, so a page never waits on the store's reads of a large fleet."""

    def __init__(self, store: StoreReader, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.store, self.cfg, self.clock = store, cfg, clock
        self.max_age_s = max(0.5, cfg.dashboard.refresh_s / 2)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._rebuilding = threading.Lock()

    def _current_since(self, type_: str) -> float:
        """Answers older than three intervals of their type's schedule are not 'current'."""
        interval = self.cfg.controller.schedule.get(type_, 300)
        return self.clock() - 3 * max(interval, self.cfg.dashboard.silent_after_s / 3)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            with self._lock:  # the first viewers wait for one read
                if self._snapshot is None:
                    self._snapshot = self._build()
                return self._snapshot
        if self.clock() - snap.taken_at >= self.max_age_s and self._rebuilding.acquire(blocking=False):
            threading.Thread(target=self._rebuild, name="dashboard-snapshot", daemon=True).start()
        return snap

    def _rebuild(self) -> None:
        try:
            self._snapshot = self._build()
        except Exception:  # a busy or restarting store: keep serving the last snapshot, try next time
            logging.getLogger("fleet.dashboard").exception("cannot read the fleet from the store")
        finally:
            self._rebuilding.release()

    def _build(self) -> Snapshot:
        started = time.perf_counter()
        now = self.clock()
        agents = self.store.agents()
        stats = self.store.agent_stats(now - self.cfg.dashboard.stats_window_s)
        cpu, memory, disk = (self.store.latest(t, self._current_since(t)) for t in ("cpu", "memory", "disk"))
        rows = []
        for a in agents:
            s = stats.get(a.agent_id) or Stats()
            c, m, d = cpu.get(a.agent_id), memory.get(a.agent_id), disk.get(a.agent_id)
            disk_pct, mount = fullest_disk(d.data if d else None)
            rows.append(FleetRow(agent_id=a.agent_id, state=agent_state(a, now, self.cfg.dashboard.silent_after_s),
                                 last_seen=a.last_seen, hostname=a.hostname, platform=a.platform, issued=s.issued,
                                 answered=s.answered, median_latency_ms=s.median_latency_ms,
                                 cpu=cpu_percent(c.data) if c else None,
                                 memory=memory_percent(m.data) if m else None, disk=disk_pct, disk_mount=mount,
                                 labels=a.labels))
        counts = {state: 0 for state in STATES}
        by_label: dict[tuple[str, str], set[int]] = {}
        for i, row in enumerate(rows):
            counts[row.state] += 1
            for pair in row.labels.items():
                by_label.setdefault(pair, set()).add(i)
        return Snapshot(rows=rows, agents={a.agent_id: a for a in agents}, counts=counts, taken_at=now,
                        took_ms=(time.perf_counter() - started) * 1000, by_label=by_label)

    def page(self, query: FleetQuery) -> FleetPage:
        snap = self.snapshot()
        needle = query.q.lower()
        rows = [r for r in snap.labelled(query.labels) if (not query.state or r.state == query.state)
                and (not needle or needle in r.agent_id.lower() or needle in (r.hostname or "").lower()
                     or needle in (r.platform or "").lower())]
        rows = sort_rows(rows, query.sort, query.desc)
        pages = max(1, -(-len(rows) // query.per_page))
        page = min(query.page, pages)
        start = (page - 1) * query.per_page
        return FleetPage(rows=rows[start:start + query.per_page], matched=len(rows), pages=pages,
                         query=dataclasses.replace(query, page=page),
                         snapshot=snap)

    # one agent
    def agent(self, agent_id: str) -> AgentRecord | None:
        found = self.snapshot().agents.get(agent_id)  # else it is newer than the snapshot
        return found or next((a for a in self.store.agents() if a.agent_id == agent_id), None)

    def newest(self, agent_id: str, type_: str) -> RequestRecord | None:
        return next((r for r in self.store.history(agent_id, type_, limit=20) if r.state == "ok"), None)

    def recent(self, agent_id: str, limit: int = 20) -> list[RequestRecord]:
        return self.store.recent_requests(agent_id, limit)

    def series(self, agent_id: str, range_s: float) -> dict[str, dict[str, Any]]:
        """The charts' series over the last `range_s`: from the raw answers while the range lies
        within their retention, else from the hourly trends (each hour's average)."""
        now = self.clock()
        since = now - range_s
        retention = self.cfg.persister.retention_s
        if range_s > min(retention.get(t, retention["default"]) for t in ("cpu", "memory", "disk", "network")):
            def hourly(series: str) -> list[TrendRecord]:
                return self.store.trends(agent_id, series, since, now)

            return {"cpu": trend_series(hourly("cpu_percent"), "cpu %").to_dict(),
                    "memory": trend_series(hourly("memory_percent"), "memory %").to_dict(),
                    "disk": trend_series(hourly("disk_used_percent"), None).to_dict(),
                    "network": network_trend_series(hourly("network_rx_bytes_per_s"),
                                                    hourly("network_tx_bytes_per_s")).to_dict()}

        def answers(type_: str) -> list[RequestRecord]:
            found = [r for r in self.store.history(agent_id, type_, limit=MAX_POINTS, since_s=since)
                     if r.state == "ok" and r.data is not None]
            return sorted(found, key=answer_time)

        return {"cpu": percent_series(answers("cpu"), "cpu %", cpu_percent).to_dict(),
                "memory": percent_series(answers("memory"), "memory %", memory_percent).to_dict(),
                "disk": disk_series(answers("disk")).to_dict(),
                "network": network_series(answers("network")).to_dict()}

    def rejected(self, limit: int = 200) -> list[Any]:
        return self.store.rejected(limit)


def sort_rows(rows: Sequence[FleetRow], key: str, desc: bool) -> list[FleetRow]:
    """Sorted by `key`; rows without a value go last whichever the direction."""
    getters: dict[str, Callable[[FleetRow], Any]] = {
        "agent_id": lambda r: r.agent_id, "state": lambda r: STATES.index(r.state), "last_seen": lambda r: r.last_seen,
        "answered": lambda r: r.answered_ratio, "latency": lambda r: r.median_latency_ms, "cpu": lambda r: r.cpu,
        "memory": lambda r: r.memory, "disk": lambda r: r.disk}
    get = getters[key]
    present = [r for r in rows if get(r) is not None]
    missing = [r for r in rows if get(r) is None]
    present.sort(key=lambda r: (get(r), r.agent_id), reverse=desc)
    return present + missing


def answer_time(rec: RequestRecord) -> float:
    return parse_iso(rec.answered_at or rec.issued_at or "1970-01-01T00:00:00Z")


def percent_series(records: Sequence[RequestRecord], name: str,
                   pick: Callable[[dict[str, Any] | None], float | None]) -> Series:
    return Series(t=[answer_time(r) for r in records], lines={name: [pick(r.data) for r in records]})


def disk_series(records: Sequence[RequestRecord], max_lines: int = 6) -> Series:
    """Used % per mount point, the fullest `max_lines` of the newest answer."""
    newest = (records[-1].data or {}).get("partitions") or [] if records else []
    mounts = [str(p.get("mountpoint")) for p in sorted(newest, key=lambda p: -(_number(p.get("percent")) or 0))
              if isinstance(p, dict)][:max_lines]
    lines: dict[str, list[float | None]] = {m: [] for m in mounts}
    for r in records:
        by_mount = {str(p.get("mountpoint")): _number(p.get("percent"))
                    for p in (r.data or {}).get("partitions") or [] if isinstance(p, dict)}
        for m in mounts:
            lines[m].append(by_mount.get(m))
    return Series(t=[answer_time(r) for r in records], lines=lines)


def network_series(records: Sequence[RequestRecord]) -> Series:
    """Bytes per second received and sent, all interfaces but loopback, from the counters' deltas
    between consecutive answers (a counter that went backwards, as after a reboot, leaves a gap)."""
    def totals(rec: RequestRecord) -> tuple[float, float]:
        nics = [n for n in (rec.data or {}).get("interfaces") or [] if isinstance(n, dict) and n.get("name") != "lo"]
        return (sum(_number(n.get("bytes_recv")) or 0 for n in nics), sum(_number(n.get("bytes_sent")) or 0
                                                                           for n in nics))

    out = Series(lines={"received B/s": [], "sent B/s": []})
    prev: tuple[float, tuple[float, float]] | None = None
    for rec in records:
        at, now = answer_time(rec), totals(rec)
        if prev is not None and at > prev[0]:
            dt = at - prev[0]
            rates = [(b - a) / dt if b >= a else None for a, b in zip(prev[1], now)]
            out.t.append(at)
            out.lines["received B/s"].append(rates[0])
            out.lines["sent B/s"].append(rates[1])
        prev = (at, now)
    return out


def trend_series(records: Sequence[TrendRecord], name: str | None, max_lines: int = 6) -> Series:
    """Each hour's average: one line named `name`, or with None one per key (mount point), the
    fullest `max_lines` of the newest hour."""
    hours = sorted({r.hour for r in records})
    newest = {r.key: r.avg for r in records if r.hour == hours[-1]} if hours else {}
    keys = [""] if name is not None else sorted(newest, key=lambda k: -newest[k])[:max_lines]
    by = {(r.key, r.hour): r.avg for r in records}
    return Series(t=[parse_iso(h) for h in hours],
                  lines={name if name is not None else k: [by.get((k, h)) for h in hours] for k in keys})


def network_trend_series(rx: Sequence[TrendRecord], tx: Sequence[TrendRecord]) -> Series:
    """Bytes per second received and sent per hour, the hour's average summed over all interfaces
    but loopback, as the raw chart shows them."""
    def totals(records: Sequence[TrendRecord]) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in records:
            if r.key != "lo":
                out[r.hour] = out.get(r.hour, 0.0) + r.avg
        return out

    received, sent = totals(rx), totals(tx)
    hours = sorted(set(received) | set(sent))
    return Series(t=[parse_iso(h) for h in hours], lines={"received B/s": [received.get(h) for h in hours],
                                                          "sent B/s": [sent.get(h) for h in hours]})
