"""`network`: per-interface counters, state and addresses, as a list (never keyed by NIC name)."""

from __future__ import annotations

from typing import Any

import psutil

from .base import JsonObject, attempt, checked_params, jsonable, register

COUNTERS = ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "errin", "errout", "dropin", "dropout")


def _family(value: Any) -> str:
    if value == getattr(psutil, "AF_LINK", None):
        return "link"
    return str(getattr(value, "name", value))


def _interfaces() -> list[JsonObject]:
    counters: dict[str, Any] = attempt(lambda: psutil.net_io_counters(pernic=True), {}) or {}
    stats: dict[str, Any] = attempt(psutil.net_if_stats, {}) or {}
    try:
        addrs: dict[str, Any] = psutil.net_if_addrs()
    except Exception:
        addrs = {}
    out: list[JsonObject] = []
    for name in sorted(set(counters) | set(stats) | set(addrs)):
        entry: JsonObject = {"name": name}
        c = counters.get(name) or {}
        entry.update({k: c.get(k) for k in COUNTERS})
        s = stats.get(name) or {}
        entry.update(isup=s.get("isup"), speed_mbps=s.get("speed"), mtu=s.get("mtu"), duplex=s.get("duplex"))
        entry["addresses"] = [
            {"family": _family(a.family), "address": a.address, "netmask": a.netmask}
            for a in addrs.get(name, [])
        ]
        out.append(jsonable(entry))
    return out


@register("network")
def collect(params: JsonObject) -> JsonObject:
    checked_params("network", params)
    return {
        "interfaces": _interfaces(),
        "totals": attempt(lambda: psutil.net_io_counters(pernic=False)),
    }
