"""How fast /metrics is for a large fleet: the background refresh (read the store, render the page)
and a scrape over HTTP, as Prometheus makes it, plain and gzipped.

Fills a fresh SQLite store as bench/dashboard.py does (N agents, `--answers` rounds of cpu, memory,
disk, network and ping answers, plus os_info and processes), serves the dashboard with waitress on
a free loopback port in this process, and times refreshes and scrapes. The store is filled anew
each run: its answers are dated from now, and a minute or two later the cpu answers would no
longer be current, and the page would shrink.

    .venv/bin/python bench/metrics.py --agents 10000             # prints a table, exit 1 if a scrape >= 1 s
    .venv/bin/python bench/run.py --only metrics                  # the same, as a stage of `make bench`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any, Callable

import psutil
from prometheus_client.parser import text_string_to_metric_families

from dashboard import populate
from fleet_common.config import load_config
from fleet_dashboard.app import create_app
from fleet_dashboard.exposition import Exposition, StoreReads, newest_answers
from fleet_store.sqlite import SqliteStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_ms(url: str, gzipped: bool) -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        body = resp.read()
    return (time.perf_counter() - started) * 1000, len(body)


def measure(agents: int, answers: int = 10, db: Path | None = None, refreshes: int = 5,
            scrapes: int = 20) -> dict[str, Any]:
    db = db or Path(tempfile.mkdtemp()) / "fleet.db"
    port = free_port()
    cfg = load_config(None, env={"FLEET_PERSISTER_SQLITE_PATH": str(db), "FLEET_DASHBOARD_PORT": str(port)})
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    store = SqliteStore(str(db))
    started = time.perf_counter()
    t0 = time.time()  # what populate dates the answers from: the clock below stays near it
    populate(store, agents, answers, cfg.dashboard.stats_window_s)
    populate_s = round(time.perf_counter() - started, 1)
    from waitress.server import create_server

    app = create_app(cfg, store)
    exposition: Exposition = app.extensions["fleet_metrics"]
    rss_before = psutil.Process().memory_info().rss
    clock = [t0]
    exposition.clock = lambda: clock[0]  # so the answers stay as current as at t0, however long this takes
    full = []  # every part read, as the first refresh does
    for _ in range(refreshes):
        exposition.reads = StoreReads(store, cfg)
        full.append(exposition.refresh())
    steady = []  # refreshes dashboard.metrics_refresh_s apart: each reads what has fallen due by then
    for k in range(1, refreshes + 1):
        clock[0] = t0 + k * cfg.dashboard.metrics_refresh_s
        steady.append(exposition.refresh())
    snapshot_mb = round((psutil.Process().memory_info().rss - rss_before) / 2 ** 20, 1)
    since = {type_: t0 - 3 * interval_s for type_, interval_s in cfg.controller.schedule.items()}
    reads = {type_: timed(partial(newest_answers, store, {type_: since[type_]}), refreshes) for type_ in since}
    reads["answered ratio"] = timed(lambda: store.agent_stats(t0 - cfg.dashboard.stats_window_s), refreshes)
    reads["agents"] = timed(store.agents, refreshes)
    server = create_server(app, host="127.0.0.1", port=port, threads=4)  # scrapes: the last page, not timed above
    def run() -> None:
        with contextlib.suppress(OSError):  # close() below pulls the socket from under its loop
            server.run()

    thread = threading.Thread(target=run, name="bench-metrics-http", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        plain = [scrape_ms(url, False) for _ in range(scrapes)]
        zipped = [scrape_ms(url, True) for _ in range(scrapes)]
        time.sleep(0.2)  # the last reply's channel finishes before the server closes
    finally:
        server.close()
        thread.join(5)
        store.close()
    page = full[-1]
    series = sum(len(f.samples) for f in text_string_to_metric_families(page.text.decode()))
    return {"agents": agents, "populate_s": populate_s, "series": series, "bytes": len(page.text),
            "bytes_gzip": len(page.gzipped), "rss_growth_mb": snapshot_mb,
            "refresh_full_read": ms([p.read_s * 1000 for p in full]),
            "refresh_full": ms([(p.read_s + p.render_s) * 1000 for p in full]),
            "refresh_steady": ms([(p.read_s + p.render_s) * 1000 for p in steady]),
            "refresh_steady_read": ms([p.read_s * 1000 for p in steady]),
            "refresh_render": ms([p.render_s * 1000 for p in full + steady]),
            "reads": {name: ms(v) for name, v in reads.items()},
            "scrape_plain": ms([t for t, _ in plain]), "scrape_gzip": ms([t for t, _ in zipped])}


def timed(fn: Callable[[], Any], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1)}


def report(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['agents']} agents: {r['series']:,} series, {r['bytes'] / 1e6:.1f} MB a scrape "
             f"({r['bytes_gzip'] / 1e6:.2f} MB gzipped); the dashboard grew {r['rss_growth_mb']} MB holding it"]
    rows = [(name, r[key]) for key, name in (
        ("scrape_plain", "scrape over HTTP, plain"), ("scrape_gzip", "scrape over HTTP, gzip"),
        ("refresh_full", "refresh, every part read"), ("refresh_full_read", "  of which reading the store"),
        ("refresh_steady", "refresh, one interval after"), ("refresh_steady_read", "  of which reading the store"),
        ("refresh_render", "render + gzip, each refresh"))]
    rows += [(f"read: {name}", fig) for name, fig in r["reads"].items()]
    for name, fig in rows:
        lines.append(f"  {name:<30} median {fig['median_ms']:>8.1f} ms   max {fig['max_ms']:>8.1f} ms")
    return lines


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--answers", type=int, default=10, help="rounds of each type per agent in the window")
    parser.add_argument("--db", help="SQLite file, replaced (default: a new temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = measure(args.agents, args.answers, Path(args.db) if args.db else None)
    print(json.dumps(r, indent=2) if args.json else "\n".join(report(r)))
    return 0 if max(r["scrape_plain"]["max_ms"], r["scrape_gzip"]["max_ms"]) < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
