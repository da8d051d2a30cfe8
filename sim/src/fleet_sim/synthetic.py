"""Synthetic readings for every built-in request type, shaped and sized like the real agent's.

A simulated host is a `Host`: a few numbers derived from a stable hash of its id (CPU
count, memory, disks, NICs, which of a handful of process tables it runs). Readings
change on every call (counters grow, percentages move), and are serialised straight to
JSON text: a 10,000-agent fleet answers over a thousand requests a second on a 2-core
machine, so the large answer (processes) is spliced from pre-rendered row fragments
rather than built as dicts and dumped.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from fleet_common.datatypes import BUILTIN
from fleet_common.errors import ContractError
from fleet_common.messages import JsonObject, dumps
from fleet_common.timefmt import iso

DEFAULT_PROCESSES = 250
PROFILES = 16
_NAMES = ("systemd", "kthreadd", "rcu_gp", "kworker/0:1", "ksoftirqd/0", "migration/0", "sshd", "cron",
          "rsyslogd", "dbus-daemon", "systemd-journald", "systemd-udevd", "systemd-logind", "chronyd", "nginx",
          "postgres", "python3", "java", "node", "containerd", "dockerd", "containerd-shim", "bash", "sudo",
          "agetty", "polkitd", "snapd", "redis-server", "haproxy", "node_exporter", "fleet-agent", "gunicorn")
_USERS = ("root", "root", "root", "www-data", "postgres", "nobody", "systemd-network", "app")
_STATES = ("sleeping", "sleeping", "sleeping", "sleeping", "running", "idle", "disk-sleep")
_CPU_VALUES = tuple(f"{v:.1f}" for v in (random.Random(1).expovariate(1.5) for _ in range(997)))
_RSS_VALUES = tuple(str(int(random.Random(2).lognormvariate(16.5, 1.3)) // 4096 * 4096) for _ in range(991))


class BadParams(ValueError):
    """The request's params are not acceptable; the answer is `bad_request`, as from the agent."""


def stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class ProcessRow:
    pid: int
    name: str
    create_time: float
    head: str  # '{"pid":..,"ppid":..,"name":..,"username":..,"status":..,"cpu_percent":'
    tail: str  # ',"create_time":..,"num_threads":..}'


def _process_table(seed: int, count: int) -> tuple[ProcessRow, ...]:
    rng = random.Random(seed)
    boot = 1_790_000_000 + rng.randrange(0, 5_000_000)
    rows = []
    pid = 1
    for i in range(count):
        name = _NAMES[i] if i < len(_NAMES) else rng.choice(_NAMES)
        ppid = 0 if i < 2 else rng.choice((1, 1, 2, max(1, pid - rng.randrange(1, 50))))
        created = round(boot + (0 if i < 40 else rng.uniform(0, 4_000_000)), 2)
        head = (f'{{"pid":{pid},"ppid":{ppid},"name":{json.dumps(name)},"username":"{rng.choice(_USERS)}",'
                f'"status":"{rng.choice(_STATES)}","cpu_percent":')
        tail = f',"create_time":{created},"num_threads":{rng.choice((1, 1, 1, 2, 4, 8, 16, 64))}}}'
        rows.append(ProcessRow(pid, name, created, head, tail))
        pid += rng.randrange(1, 400)
    return tuple(rows)


_TABLES: dict[tuple[int, int], tuple[ProcessRow, ...]] = {}


def process_table(profile: int, count: int) -> tuple[ProcessRow, ...]:
    """One of PROFILES shared process tables (10,000 hosts need not hold 10,000 tables)."""
    key = (profile, count)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = _process_table(profile * 7919 + count, count)
    return table


class Host:
    """A simulated host: stable shape from its id, fresh readings on each call."""

    __slots__ = ("boot_time", "calls", "cpus", "disks", "id", "mem_total", "nics", "processes", "profile")

    def __init__(self, host_id: str, processes: int = DEFAULT_PROCESSES) -> None:
        seed = stable_seed(host_id)
        self.id = host_id
        self.profile = seed % PROFILES
        self.cpus = (2, 4, 4, 8, 8, 16, 32, 64)[(seed >> 8) % 8]
        self.mem_total = self.cpus * (2 << 30) * (1 + (seed >> 12) % 4)
        self.disks = 1 + (seed >> 16) % 4
        self.nics = 2 + (seed >> 20) % 4
        self.processes = processes
        self.boot_time = 1_790_000_000 + (seed >> 24) % 5_000_000
        self.calls = (seed >> 32) % 100_000  # a per-host phase for the moving numbers

    def reading(self, type_: str, params: JsonObject) -> bytes:
        """The `data` object of an answer, as JSON bytes; BadParams for params the agent refuses."""
        maker = READINGS.get(type_)
        if maker is None:
            raise KeyError(type_)
        self.calls += 1
        return maker(self, params)


def _params(type_: str, params: JsonObject) -> JsonObject:
    """The request's params, checked as the agent checks them (fleet_common.datatypes)."""
    try:
        return BUILTIN[type_].check_params(params)
    except ContractError as exc:
        raise BadParams(exc.detail) from None


def _rng(host: Host) -> random.Random:
    return random.Random(host.calls * 1_000_003 + stable_seed(host.id) % 1_000_003)


def _os_info(host: Host, params: JsonObject) -> bytes:
    _params("os_info", params)
    now = time.time()
    return dumps({"hostname": host.id, "os": "Linux", "release": "6.1.0-21-amd64",
                  "version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.90-1 (2024-05-03)",
                  "platform": "Linux-6.1.0-21-amd64-x86_64-with-glibc2.36",
                  "distro": {"id": "debian", "name": "Debian GNU/Linux", "version_id": "12",
                             "pretty_name": "Debian GNU/Linux 12 (bookworm)"},
                  "arch": "x86_64", "boot_time": iso(host.boot_time), "uptime_s": round(now - host.boot_time, 1),
                  "cpu_count": host.cpus, "cpu_count_physical": max(1, host.cpus // 2),
                  "python_version": "3.11.2", "byteorder": "little",
                  "users": [{"name": "admin", "terminal": "pts/0", "host": "10.0.0.5", "started": iso(now - 3600)}]})


def _cpu(host: Host, params: JsonObject) -> bytes:
    _params("cpu", params)
    rng = _rng(host)
    per_cpu = [round(rng.uniform(0, 60), 1) for _ in range(host.cpus)]
    busy = round(sum(per_cpu) / len(per_cpu), 1)
    user = round(busy * 0.7, 1)
    return dumps({"percent": busy, "per_cpu": per_cpu,
                  "times_percent": {"user": user, "nice": 0.0, "system": round(busy - user, 1),
                                    "idle": round(100 - busy, 1), "iowait": 0.2, "irq": 0.0, "softirq": 0.1,
                                    "steal": 0.0, "guest": 0.0, "guest_nice": 0.0},
                  "interval_s": 60.0, "count": host.cpus, "count_physical": max(1, host.cpus // 2),
                  "load_avg": [round(busy * host.cpus / 100, 2)] * 3,
                  "freq_mhz": {"current": 2600.0, "min": 800.0, "max": 3500.0},
                  "ctx_switches": 1_000_000 + host.calls * 5000, "interrupts": 500_000 + host.calls * 2000})


def _memory(host: Host, params: JsonObject) -> bytes:
    _params("memory", params)
    rng = _rng(host)
    used = int(host.mem_total * rng.uniform(0.2, 0.8))
    cached = (host.mem_total - used) // 2
    return dumps({"virtual": {"total": host.mem_total, "available": host.mem_total - used,
                              "percent": round(100 * used / host.mem_total, 1), "used": used,
                              "free": host.mem_total - used - cached, "active": used // 2, "inactive": used // 3,
                              "buffers": 4 << 20, "cached": cached, "shared": 64 << 20, "slab": 128 << 20},
                  "swap": {"total": 2 << 30, "used": 0, "free": 2 << 30, "percent": 0.0, "sin": 0, "sout": 0}})


def _disk(host: Host, params: JsonObject) -> bytes:
    _params("disk", params)
    mounts = ("/", "/var", "/home", "/srv")
    parts = []
    for i in range(host.disks):
        total = (64 << 30) * (i + 1) * 4
        used = total * ((host.calls + i * 17) % 90 + 5) // 100
        parts.append({"device": f"/dev/nvme0n1p{i + 1}", "mountpoint": mounts[i], "fstype": "ext4",
                      "opts": "rw,relatime,errors=remount-ro", "total": total, "used": used, "free": total - used,
                      "percent": round(100 * used / total, 1)})
    n = host.calls

    def io(name: str, k: int) -> JsonObject:
        return {"name": name, "read_count": 75_000 * k + n * 11, "write_count": 35_000 * k + n * 29,
                "read_bytes": 2_000_000_000 * k + n * 45_056, "write_bytes": 1_100_000_000 * k + n * 118_784,
                "read_time": 58_000 * k + n, "write_time": 14_000 * k + n * 3,
                "read_merged_count": 10_900 * k, "write_merged_count": 28_500 * k, "busy_time": 11_900 * k + n}

    per_disk = [io(f"nvme0n1p{i + 1}", i + 1) for i in range(host.disks)] + [io("nvme0n1", host.disks)]
    total_io = {k: v for k, v in io("", host.disks + 1).items() if k != "name"}
    return dumps({"partitions": parts, "io": total_io, "io_per_disk": per_disk})


def _network(host: Host, params: JsonObject) -> bytes:
    _params("network", params)
    n = host.calls
    interfaces = []
    for i in range(host.nics):
        name = "lo" if i == 0 else f"eth{i - 1}"
        addresses = [{"family": "AF_INET", "address": "127.0.0.1" if i == 0 else f"10.{i}.{n % 250}.{i + 10}",
                      "netmask": "255.0.0.0" if i == 0 else "255.255.255.0"},
                     {"family": "AF_INET6", "address": "::1" if i == 0 else f"fe80::{i}:ff:fe00:{i}%{name}",
                      "netmask": "ffff:ffff:ffff:ffff::"},
                     {"family": "link", "address": f"02:fc:00:00:00:{i:02x}", "netmask": None}]
        interfaces.append({"name": name, "bytes_sent": 262_341 * (i + 1) + n * 9_000,
                           "bytes_recv": 131_895_083 * (i + 1) + n * 31_000, "packets_sent": 2454 + n * 40,
                           "packets_recv": 3695 + n * 70, "errin": 0, "errout": 0, "dropin": n % 3, "dropout": 0,
                           "isup": True, "speed_mbps": 0 if i == 0 else 10_000, "mtu": 65536 if i == 0 else 1500,
                           "duplex": "NIC_DUPLEX_FULL", "addresses": addresses})
    return dumps({"interfaces": interfaces})


def _ping(host: Host, params: JsonObject) -> bytes:
    _params("ping", params)
    return b"{}"


def _processes(host: Host, params: JsonObject) -> bytes:
    checked = _params("processes", params)
    # Without `limit` a simulated host lists every process: the heavy answer the sizing is about
    # (the real agent's default is the top 50; an operator may ask for all).
    limit = params.get("limit", host.processes)
    sort_by = checked["sort_by"]
    table = process_table(host.profile, host.processes)
    k = host.calls
    cpus, rsss = _CPU_VALUES, _RSS_VALUES
    picked = [(row, cpus[(i * 7 + k) % len(cpus)], rsss[(i * 13 + k) % len(rsss)]) for i, row in enumerate(table)]
    key: Callable[[tuple[ProcessRow, str, str]], Any] = {
        "cpu_percent": lambda p: -float(p[1]), "rss": lambda p: -int(p[2]),
        "create_time": lambda p: -p[0].create_time, "pid": lambda p: p[0].pid, "name": lambda p: p[0].name,
    }[sort_by]
    picked.sort(key=key)
    body = ",".join([f'{row.head}{cpu},"rss":{rss}{row.tail}' for row, cpu, rss in picked[:limit]])
    return (f'{{"processes":[{body}],"total":{len(table)},"sort_by":"{sort_by}","limit":{limit}}}').encode()


READINGS: dict[str, Callable[[Host, JsonObject], bytes]] = {
    "cpu": _cpu, "disk": _disk, "memory": _memory, "network": _network, "os_info": _os_info, "ping": _ping,
    "processes": _processes,
}
TYPES: list[str] = sorted(READINGS)
