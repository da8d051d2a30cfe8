"""How fast the dashboard's pages render for a large fleet.

Fills a fresh SQLite store through the persister's own write path with N agents (labelled role and dc), each with a
status and `--answers` rounds of cpu, memory, disk, network and ping answers inside the
dashboard's stats window (plus os_info and a 250-row process list), then times the pages
through the Flask app in this process: the first (cold) fleet page, which reads the store,
and later ones, which share the snapshot, plus an agent page, its chart series and the
rejected page.

    .venv/bin/python bench/dashboard.py --agents 10000            # prints a table, exit 1 if a page >= 1 s
    .venv/bin/python bench/dashboard.py --agents 10000 --db /tmp/fleet10k.db --keep   # reuse the file
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from fleet_common import Request, Response, Status, Topics, iso
from fleet_common.config import load_config
from fleet_dashboard.app import create_app
from fleet_store import Batch, Incoming, RejectedRecord
from fleet_store.sqlite import SqliteStore

TYPES = ("cpu", "memory", "disk", "network", "ping")
ROLES, SITES = ("web", "db", "build", "cache"), ("ams", "fra", "lon")


def reading(type_: str, rng: random.Random, round_: int) -> dict[str, Any]:
    if type_ == "cpu":
        return {"percent": round(rng.uniform(1, 99), 1), "per_cpu": [round(rng.uniform(0, 100), 1) for _ in range(4)],
                "load_avg": [0.4, 0.3, 0.2], "freq_mhz": 2400.0, "ctx_switches": 10 ** 6 + round_}
    if type_ == "memory":
        return {"virtual": {"total": 8 << 30, "available": 4 << 30, "used": 4 << 30,
                            "percent": round(rng.uniform(10, 95), 1)}, "swap": {"total": 0, "used": 0, "percent": 0.0}}
    if type_ == "disk":
        return {"partitions": [{"device": f"/dev/sd{c}1", "mountpoint": m, "fstype": "ext4", "total": 100 << 30,
                                "used": 50 << 30, "free": 50 << 30, "percent": round(rng.uniform(5, 99), 1)}
                               for c, m in (("a", "/"), ("b", "/var"), ("c", "/srv"))], "io": {"read_bytes": 1}}
    if type_ == "network":
        return {"interfaces": [{"name": n, "bytes_sent": 10 ** 6 * round_, "bytes_recv": 3 * 10 ** 6 * round_,
                                "packets_sent": round_, "packets_recv": round_, "errin": 0, "errout": 0,
                                "dropin": 0, "dropout": 0} for n in ("lo", "eth0")]}
    if type_ == "processes":
        return {"processes": [{"pid": p, "ppid": 1, "name": f"proc-{p % 40}", "username": "root", "status": "sleeping",
                               "cpu_percent": round(rng.uniform(0, 5), 1), "rss": rng.randrange(1 << 20, 1 << 30),
                               "create_time": "2026-01-01T00:00:00.000Z"} for p in range(1, 251)]}
    if type_ == "os_info":
        return {"hostname": "h", "os": "Linux", "release": "6.1.0", "version": "#1 SMP", "arch": "x86_64",
                "boot_time": "2026-01-01T00:00:00.000Z", "uptime_s": 1000, "cpu_count": 4, "users": []}
    return {}


def populate(store: SqliteStore, agents: int, answers: int, window_s: float) -> None:
    now, rng = time.time(), random.Random(1)
    step = window_s * 0.9 / max(answers, 1)
    for first in range(0, agents, 250):
        batch = Batch()
        for n in range(first, min(first + 250, agents)):
            agent = f"host-{n:05d}"
            batch.statuses.append(Incoming(Status(agent_id=agent, online=n % 50 != 0, ts=iso(now - 60),
                                                  hostname=agent, platform="Linux-6.1.0-x86_64",
                                                  agent_version="0.1.0", types=[*TYPES, "os_info", "processes"],
                                                  labels={"role": ROLES[n % 4], "dc": SITES[n % 3]}),
                                           agent, iso(now - 60)))
            rounds = [(t, r) for r in range(answers) for t in TYPES] + [("os_info", answers), ("processes", answers)]
            for type_, r in rounds:
                at = now - window_s * 0.9 + r * step if r < answers else now - 30
                rid = f"{agent}-{type_}-{r}"
                batch.requests.append(Incoming(Request(id=rid, type=type_, issued_at=iso(at), expires_at=iso(at + 60)),
                                               agent, iso(at)))
                if n % 97 != 0 or r < answers - 1:  # a few agents leave their last round pending
                    batch.responses.append(Incoming(Response(
                        id=rid, agent_id=agent, type=type_, status="ok", data=reading(type_, rng, r),
                        collected_at=iso(at + rng.uniform(0.002, 0.05))), agent, iso(at + 0.06)))
        store.write(batch)
    topic = Topics().response("h", "cpu")
    store.write(Batch(rejected=[RejectedRecord(id=f"x{i}", received_at=iso(now - i), topic=topic,
                                               reason="bad_json", payload="{nope") for i in range(300)]))


def timed(fn: Callable[[], Any], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--answers", type=int, default=10, help="rounds of each type per agent in the window")
    parser.add_argument("--db", help="SQLite file (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="reuse --db if it exists")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "fleet.db"
    cfg = load_config(None, env={"FLEET_PERSISTER_SQLITE_PATH": str(db)})
    fresh = not (args.keep and db.exists())
    if fresh and db.exists():
        db.unlink()
    store = SqliteStore(str(db))
    if fresh:
        started = time.perf_counter()
        populate(store, args.agents, args.answers, cfg.dashboard.stats_window_s)
        print(f"populated {db} with {args.agents} agents in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = store.count_requests()
    app = create_app(cfg, store)
    client = app.test_client()
    fleet = app.extensions["fleet"]

    def get(url: str) -> Callable[[], Any]:
        def call() -> Any:
            resp = client.get(url)
            assert resp.status_code == 200, (url, resp.status_code)
            return resp
        return call

    def cold_fleet() -> Any:
        fleet._snapshot = None  # what the first viewer after each refresh interval pays
        return get("/")()

    agent = "host-00001"
    results = {
        "fleet page, cold (reads the store)": timed(cold_fleet, 3),
        "fleet page, shared snapshot": timed(get("/"), 10),
        "fleet page sorted by cpu, filtered": timed(get("/?sort=cpu&dir=desc&q=host-01"), 10),
        "fleet page filtered by two labels": timed(get("/?label=role=web&label=dc=ams&sort=cpu&dir=desc"), 10),
        "agent page": timed(get(f"/agent/{agent}"), 10),
        "agent chart series (1h)": timed(get(f"/api/agent/{agent}/series?range=1h"), 10),
        "rejected page": timed(get("/rejected"), 10),
    }
    store.close()
    summary = {name: {"median_ms": round(statistics.median(v), 1), "max_ms": round(max(v), 1)}
               for name, v in results.items()}
    if args.json:
        print(json.dumps({"agents": args.agents, "requests": rows, "pages": summary}, indent=2))
    else:
        print(f"{args.agents} agents, {rows} stored requests (SQLite)")
        for name, s in summary.items():
            print(f"  {name:<40} median {s['median_ms']:>7.1f} ms   max {s['max_ms']:>7.1f} ms")
    return 0 if all(s["max_ms"] < 1000 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
