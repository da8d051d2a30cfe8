"""Hourly trends: min, avg, max and count per agent, numeric series, key and hour, kept long after
the raw answers (`persister.trend_retention_s`).

Both stores add the samples of every answer new to them in the same write as the answer, so a
trend is as current as the raw answers and nothing is lost or counted twice when a persister
restarts: an answer redelivered after it was stored is not new, and is not counted again.

The series (`key` is '' for host-wide ones):

| series | key | from |
|---|---|---|
| cpu_percent, load1, load5, load15 | '' | cpu: percent, load_avg |
| memory_percent, swap_percent | '' | memory: virtual.percent, swap.percent |
| disk_used_percent | mountpoint | disk: partitions[].percent |
| network_rx_bytes_per_s, network_tx_bytes_per_s | interface | network: interfaces[].bytes_recv/bytes_sent, |
| | | the delta from the agent's previous answer over the time between them |

One answer adds at most MAX_KEYS mount points or interfaces, of names up to MAX_KEY_CHARS.
A network rate needs the answer before it: the first answer of an agent has none, and a counter
that went down (a reset, a reboot) or an answer older than the newest stored gives no rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleet_common import iso, parse_iso

TREND_TYPES = frozenset({"cpu", "memory", "disk", "network"})
SERIES = ("cpu_percent", "load1", "load5", "load15", "memory_percent", "swap_percent", "disk_used_percent",
          "network_rx_bytes_per_s", "network_tx_bytes_per_s")
# Larger values are left out: no measurement is that large, and a sum of them could overflow.
MAX_SAMPLE = 1e18
LOADS = ("load1", "load5", "load15")
# What one answer may add to trends: an agent that sends thousands of mount points or interfaces,
# or names of a megabyte, cannot make its trends grow without bound.
MAX_KEYS = 64
MAX_KEY_CHARS = 256


@dataclass(frozen=True)
class Answer:
    """A stored ok answer as trends see it: `at` is its answered_at (RFC 3339), `received_at` the
    persister's clock, which retention is counted from."""

    agent_id: str
    type: str
    at: str
    data: Any
    received_at: str


@dataclass(frozen=True)
class TrendRow:
    """One hour's aggregate to add to what is stored: the store adds count and sum, keeps the
    smaller min, the larger max and the later expire_at (the end of the hour in which the persister
    received the answer, plus trend_retention_s)."""

    agent_id: str
    series: str
    key: str
    hour: str
    count: int
    sum: float
    min: float
    max: float
    expire_at: str


@dataclass(frozen=True)
class TrendRecord:
    """An hour of one series as read back; `hour` is the hour's start, RFC 3339 UTC."""

    agent_id: str
    series: str
    key: str
    hour: str
    min: float
    avg: float
    max: float
    count: int


def hour_of(at: str) -> str:
    """The start of the hour a canonical timestamp falls in: '2026-11-26T04:00:00.000Z'."""
    return at[:14] + "00:00.000Z"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and abs(number) <= MAX_SAMPLE else None


def _get(data: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(data, dict):
            return None
        data = data.get(step)
    return data


def samples(type_: str, data: Any) -> list[tuple[str, str, float]]:
    """(series, key, value) of one cpu, memory or disk answer's data."""
    found: list[tuple[str, str, Any]] = []
    if type_ == "cpu":
        found.append(("cpu_percent", "", _get(data, "percent")))
        loads = _get(data, "load_avg")
        if isinstance(loads, list):
            found += [(name, "", value) for name, value in zip(LOADS, loads)]
    elif type_ == "memory":
        found += [("memory_percent", "", _get(data, "virtual", "percent")),
                  ("swap_percent", "", _get(data, "swap", "percent"))]
    elif type_ == "disk":
        for part in _get(data, "partitions") or ():
            mount = _get(part, "mountpoint")
            if isinstance(mount, str) and len(mount) <= MAX_KEY_CHARS and len(found) < MAX_KEYS:
                found.append(("disk_used_percent", mount, _get(part, "percent")))
    out = []
    for series, key, value in found:
        number = _number(value)
        if number is not None:
            out.append((series, key, number))
    return out


Counters = dict[str, tuple[int | float | None, int | float | None]]


def _counter(value: Any) -> int | float | None:
    """A byte counter as sent: an integer stays one, so the delta of two large counters is exact."""
    if type(value) is int:
        return value if value >= 0 else None
    return _number(value)


def counters(data: Any) -> Counters:
    """(bytes_recv, bytes_sent) per interface name of a network answer's data."""
    out: Counters = {}
    for nic in _get(data, "interfaces") or ():
        name = _get(nic, "name")
        if isinstance(name, str) and len(name) <= MAX_KEY_CHARS and len(out) < MAX_KEYS:
            out[name] = (_counter(_get(nic, "bytes_recv")), _counter(_get(nic, "bytes_sent")))
    return out



def rates(before_at: str, then: Counters, after_at: str, now: Counters) -> list[tuple[str, str, float]]:
    """Network bytes per second per interface between two answers of one agent, from their counters."""
    seconds = parse_iso(after_at) - parse_iso(before_at)
    if seconds <= 0:
        return []
    out = []
    for name, (rx, tx) in now.items():
        old = then.get(name)
        if old is None:
            continue
        for series, a, b in (("network_rx_bytes_per_s", old[0], rx), ("network_tx_bytes_per_s", old[1], tx)):
            if a is not None and b is not None and b >= a:
                rate = _number((b - a) / seconds)
                if rate is not None:
                    out.append((series, name, rate))
    return out


def roll_up(answers: Iterable[Answer], previous: Mapping[str, Answer], keep_s: int) -> list[TrendRow]:
    """The trend rows of answers new to the store. `previous`: each agent's newest network answer
    stored before these, for the first rate. A network answer no newer than the one before it (late)
    gives no rate and does not become the one before the next."""
    acc: dict[tuple[str, str, str, str], list[Any]] = {}
    expiry: dict[str, str] = {}
    last: dict[str, tuple[str, Counters]] = {}  # each agent's newest network answer: its time and counters
    for a in sorted(answers, key=lambda x: (x.agent_id, x.at)):
        if a.type == "network":
            before = last.get(a.agent_id)
            if before is None and a.agent_id in previous:
                p = previous[a.agent_id]
                before = (p.at, counters(p.data))
            if before is not None and a.at <= before[0]:
                continue
            now = counters(a.data)
            last[a.agent_id] = (a.at, now)
            found = rates(before[0], before[1], a.at, now) if before is not None else []
        else:
            found = samples(a.type, a.data)
        hour = hour_of(a.at)
        # Whole hours by the persister's clock: an hour's record changes its expire_at (and so its
        # place in the expire_at index) once an hour, not with every answer.
        received_hour = hour_of(a.received_at)
        expire_at = expiry.get(received_hour)
        if expire_at is None:
            expire_at = expiry[received_hour] = iso(parse_iso(received_hour) + 3600 + keep_s)
        for series, key, value in found:
            cell = acc.get((a.agent_id, series, key, hour))
            if cell is None:
                acc[a.agent_id, series, key, hour] = [1, value, value, value, expire_at]
            else:
                cell[0] += 1
                cell[1] += value
                cell[2], cell[3] = min(cell[2], value), max(cell[3], value)
                cell[4] = max(cell[4], expire_at)
    return [TrendRow(agent_id, series, key, hour, n, total, low, high, exp)
            for (agent_id, series, key, hour), (n, total, low, high, exp) in acc.items()]
