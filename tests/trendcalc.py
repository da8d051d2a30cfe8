"""A generated hour of answers from simulated hosts, and its trends computed by hand: written out
plainly here, apart from fleet_store.trends, so a test compares the two."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from fleet_sim.synthetic import Host

from fleet_common import iso

TYPES = ("cpu", "memory", "disk", "network")


@dataclass(frozen=True)
class Sent:
    """One answer as an agent sends it."""

    id: str
    agent_id: str
    type: str
    collected_s: float
    data: dict[str, Any]


def generated_hour(hour_s: float, agents: tuple[str, ...] = ("web-01", "db-01"), every_s: int = 60,
                   reset_at: int = 25) -> list[Sent]:
    """Every type from every agent each `every_s` through one hour, in time order. Network counters
    of the first agent drop back (a reboot) at minute `reset_at`."""
    out = []
    for agent_id in agents:
        host = Host(agent_id)
        for i in range(3600 // every_s):
            at = hour_s + i * every_s + 1.25
            for type_ in TYPES:
                data = json.loads(host.reading(type_, {}))
                if type_ == "network" and agent_id == agents[0] and i >= reset_at:
                    for nic in data["interfaces"]:  # counting again from lower values
                        nic["bytes_recv"] -= 100_000_000
                        nic["bytes_sent"] -= 200_000
                out.append(Sent(f"t{uuid.uuid4().hex}", agent_id, type_, at, data))
    out.sort(key=lambda s: s.collected_s)
    return out


def expected(sent: list[Sent]) -> dict[tuple[str, str, str, str], tuple[float, float, float, int]]:
    """(agent, series, key, hour) -> (min, avg, max, count), by hand."""
    values: dict[tuple[str, str, str, str], list[float]] = {}

    def add(s: Sent, series: str, key: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            hour = iso(s.collected_s - s.collected_s % 3600)
            values.setdefault((s.agent_id, series, key, hour), []).append(float(value))

    last: dict[str, Sent] = {}
    for s in sorted(sent, key=lambda x: x.collected_s):
        d = s.data
        if s.type == "cpu":
            add(s, "cpu_percent", "", d["percent"])
            for name, v in zip(("load1", "load5", "load15"), d["load_avg"]):
                add(s, name, "", v)
        elif s.type == "memory":
            add(s, "memory_percent", "", d["virtual"]["percent"])
            add(s, "swap_percent", "", d["swap"]["percent"])
        elif s.type == "disk":
            for p in d["partitions"]:
                add(s, "disk_used_percent", p["mountpoint"], p["percent"])
        elif s.type == "network":
            before = last.get(s.agent_id)
            last[s.agent_id] = s
            if before is None:
                continue  # the first answer has no delta
            dt = s.collected_s - before.collected_s
            old = {n["name"]: n for n in before.data["interfaces"]}
            for nic in d["interfaces"]:
                prev = old.get(nic["name"])
                if prev is None:
                    continue
                for series, field in (("network_rx_bytes_per_s", "bytes_recv"), ("network_tx_bytes_per_s",
                                                                                  "bytes_sent")):
                    delta = nic[field] - prev[field]
                    if delta >= 0:  # a counter that went back (reset) gives no rate
                        add(s, series, nic["name"], delta / dt)
    return {k: (min(v), sum(v) / len(v), max(v), len(v)) for k, v in values.items()}


def as_table(records: list[Any]) -> dict[tuple[str, str, str, str], tuple[float, float, float, int]]:
    return {(r.agent_id, r.series, r.key, r.hour): (r.min, r.avg, r.max, r.count) for r in records}


def assert_equal(got: dict[Any, tuple[float, float, float, int]],
                 want: dict[Any, tuple[float, float, float, int]]) -> None:
    assert set(got) == set(want), (f"missing {sorted(set(want) - set(got))[:5]}, "
                                   f"extra {sorted(set(got) - set(want))[:5]}")
    for key, (lo, avg, hi, n) in want.items():
        g = got[key]
        assert g[3] == n, f"{key}: count {g[3]}, by hand {n}"
        assert math.isclose(g[0], lo, rel_tol=1e-9) and math.isclose(g[2], hi, rel_tol=1e-9), (key, g, want[key])
        assert math.isclose(g[1], avg, rel_tol=1e-9), (key, g, want[key])
