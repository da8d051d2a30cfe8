"""`make bench`: the transport's ceiling and what the system does against it, in one run on
one broker; prints a table and writes bench/results.json.

    .venv/bin/python bench/run.py                 # every stage, full size (about 10 minutes)
    .venv/bin/python bench/run.py --tiny          # every stage at toy sizes (proves the bench works)
    .venv/bin/python bench/run.py --only raw,ingest --out /tmp/r.json
    .venv/bin/python bench/run.py --only storage  # bytes per host per day, per type, on both stores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import stages
import storage
from harness import ROOT, Bench, machine
from stages import TINY, Sizes

from fleet_common import compat

STAGES = ("raw", "ingest", "e2e", "fleet", "controller", "agent", "cold", "groups", "job", "storage", "metrics")


def run_stage(name: str, b: Bench, sizes: Sizes, results: dict[str, Any], profile: bool) -> dict[str, Any]:
    raw = results.get("raw") if isinstance(results.get("raw"), dict) and "error" not in results["raw"] else None
    calls: dict[str, Callable[[], dict[str, Any]]] = {
        "raw": lambda: stages.raw(b, sizes),
        "ingest": lambda: stages.ingest(b, sizes, raw),
        "e2e": lambda: stages.end_to_end(b, sizes, raw),
        "fleet": lambda: stages.fleet(b, sizes, profile),
        "controller": lambda: stages.controller(b, sizes),
        "agent": lambda: stages.agent(b, sizes),
        "cold": lambda: stages.cold_start(b, sizes),
        "job": lambda: stages.job(b, sizes),
        "storage": lambda: storage.storage(storage.TINY_STORAGE if sizes == TINY else storage.StorageSizes()),
        "groups": lambda: stages.groups(b, sizes),
        "metrics": lambda: stages.metrics(sizes),
    }
    return calls[name]()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(results: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, Any, str]] = []
    raw = results.get("raw") or {}
    ceiling = raw.get("subscriber_msgs_per_s")

    def ratio(v: float | None) -> str:
        return f"{v / ceiling:.2f}x raw" if v and ceiling else ""

    if "subscriber_msgs_per_s" in raw:
        rows += [("raw: paho sub msgs/s (live pub->sub, QoS 1)", ceiling, "1.00x raw"),
                 ("raw: paho pub msgs/s", raw["publisher_msgs_per_s"], ratio(raw["publisher_msgs_per_s"])),
                 ("raw: paho sub draining a backlog msgs/s", raw["backlog_drain_msgs_per_s"],
                  ratio(raw["backlog_drain_msgs_per_s"])),
                 ("raw: mean payload bytes", raw["mean_payload_bytes"], "")]
    ing = results.get("ingest") or {}
    for key, fig in ing.items():
        if isinstance(fig, dict) and "msgs_per_s" in fig:
            name = key.replace("_", " ")
            if "parse_workers" not in key:
                name += f", {fig.get('parse_workers')} parse worker(s) each"
            rows.append((f"ingest: {name} msgs/s", fig["msgs_per_s"], ratio(fig["msgs_per_s"])))
            if fig.get("ratio_to_raw_paired") is not None:
                rows.append(("  each run against a raw run just before it", "",
                             f"{fig['ratio_to_raw_paired']:.2f}x raw (median of "
                             + " / ".join(f"{r['ratio_to_that_raw']:.2f}" for r in fig["runs"]) + ")"))
        elif isinstance(fig, str):
            rows.append((f"ingest: {key}", fig, ""))
        elif isinstance(fig, float):
            rows.append((f"ingest: {key.replace('_', ' ')} (same settings)", f"{fig:.2f}x", ""))
    e2e = results.get("e2e") or {}
    if "steps" in e2e:
        for s in e2e["steps"]:
            rows.append((f"e2e: offered {s['offered_per_s']:.0f}/s -> stored/s, p50/p99 ms",
                         f"{s['stored_per_s']:.0f}  {_fmt(s['latency_ms_p50'])}/{_fmt(s['latency_ms_p99'])}"
                         f"{'' if s['keeps_up'] else '  (falls behind)'}", ratio(s["stored_per_s"])))
        rows.append(("e2e: highest sustained stored answers/s", e2e["max_sustained_stored_per_s"],
                     ratio(e2e["max_sustained_stored_per_s"])))
    fl = results.get("fleet") or {}
    if "requests" in fl:
        rows += [(f"fleet {fl['agents']:,}: requests in {fl['intervals']} x {fl['interval_s']} s", fl["requests"], ""),
                 ("fleet: answered and stored in time", f"{100 * (fl['in_time_share'] or 0):.3f} %", ""),
                 ("fleet: latency p50 / p99 ms", f"{_fmt(fl['latency_ms_p50'])} / {_fmt(fl['latency_ms_p99'])}", ""),
                 ("fleet: peak dispatched/s vs even share", f"{fl['peak_dispatch_per_s']} vs {fl['even_share_per_s']}",
                  f"{fl['peak_over_even']}x even"),
                 ("fleet: CPU % of a core sim/persister/controller/broker",
                  " / ".join(_fmt(fl["cpu"][k]["cpu_pct_of_core"]) for k in
                             ("simulator", "persister", "controller", "mosquitto")), "")]
    ctl = results.get("controller") or {}
    if "agents" in ctl:
        rows += [(f"controller {ctl['agents']:,} agents: CPU s per 60 s", ctl["cpu_s_per_60s_interval"],
                  f"{ctl['requests_per_s']:,} req/s"),
                 ("controller: RSS MB", ctl["peak_rss_mb"], f"{ctl['agents_asked_in_window']:,} agents asked")]
    ag = results.get("agent") or {}
    if "rss_mb_max" in ag:
        rows += [("agent: RSS MB (max)", ag["rss_mb_max"], "aim < 30"),
                 ("agent: CPU % of one core (median)", ag["cpu_pct_of_core"],
                  "aim < 2; runs " + " / ".join(_fmt(x) for x in ag.get("cpu_pct_of_core_runs", [])))]
        for t, d in ag["collection_ms"].items():
            rows.append((f"agent: {t} collection ms p50/p99", f"{_fmt(d['p50'])} / {_fmt(d['p99'])}", ""))
    cold = results.get("cold") or {}
    if "peak_requests_per_s" in cold:
        rows += [(f"cold start {cold['agents']:,} agents: peak requests/s vs budget", cold["peak_requests_per_s"],
                  f"budget {cold['budget_per_s']:,}/s"),
                 ("cold start: most messages the broker held", cold["broker_stored_max"], "$SYS store count"),
                 ("cold start: s until all seven answers of every agent stored", cold["all_seven_stored_after_s"],
                  f"agents connected in {_fmt(cold['sim_connect_s'])} s"),
                 ("cold start: requests expired / left pending", f"{cold['expired']} / {cold['pending']}",
                  f"of {cold['requests']:,}")]
    for n, fig in ((results.get("job") or {}).get("sizes") or {}).items():
        rows += [(f"job to {int(n):,} agents: send s / total s", f"{_fmt(fig['send_s'])} / {_fmt(fig['total_s'])}",
                  "all answered" if fig["all_answered"] else "NOT all answered"),
                 ("job: s reading the fleet / to the last answer", f"{_fmt(fig['fleet_read_s'])} / "
                  f"{_fmt(fig['last_answer_after_first_send_s'])}", "the last answer: from the first request"),
                 ("job: s from last answer to the end of the wait", fig["after_last_answer_s"], "aim < 2"),
                 ("job: peak publish/s; RSS growth MB", f"{_fmt(fig['peak_publish_per_s'])}; "
                  f"{_fmt(fig['rss_growth_mb'])}", f"{fig['rss_growth_kb_per_agent']} KB per agent")]
    rows += storage.table(results.get("storage") or {})
    grp = results.get("groups") or {}
    if "agents" in grp:
        rows += [(f"groups {grp['agents']:,} labelled agents: CPU s per 60 s", grp["cpu_s_per_60s_interval"],
                  f"{grp['requests_per_s']:,} req/s"),
                 ("groups: RSS MB", grp["peak_rss_mb"], ""),
                 ("groups: SIGHUP reload of every agent, ms", grp["reload_ms"],
                  f"busiest second after it {_fmt(grp['busiest_second_after_reload_over_steady'])}x steady")]
    mx = results.get("metrics") or {}
    if "scrape_plain" in mx:
        rows += [(f"metrics {mx['agents']:,} agents: scrape ms plain / gzip (median)",
                  f"{_fmt(mx['scrape_plain']['median_ms'])} / {_fmt(mx['scrape_gzip']['median_ms'])}",
                  f"{mx['series']:,} series, {mx['bytes'] / 1e6:.1f} MB ({mx['bytes_gzip'] / 1e6:.2f} MB gzip)"),
                 ("metrics: refresh ms, every part read / one interval on (median)",
                  f"{_fmt(mx['refresh_full']['median_ms'])} / {_fmt(mx['refresh_steady']['median_ms'])}",
                  "in the background, every dashboard.metrics_refresh_s")]
    for name in STAGES:
        r = results.get(name)
        if isinstance(r, dict) and "error" in r:
            rows.append((f"{name}: FAILED", r["error"].splitlines()[-1][:60], ""))
    width = max((len(r[0]) for r in rows), default=10)
    return [f"{label:<{width}}  {_fmt(value):>24}  {note}" for label, value, note in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes: proves every stage works in seconds")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--profile", action="store_true", help="py-spy the fleet stage's processes")
    p.add_argument("--broker-save-every-change", action="store_true",
                   help="run the broker as dev.conf ships (persistence saved after every change; slow at scale)")
    p.add_argument("--run-dir", default=None, help="logs, configs and databases (default data/bench/<time>)")
    args = p.parse_args(argv)
    compat.apply()  # the in-process observers run on the paho the services run
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
    sizes = TINY if args.tiny else Sizes()
    run_dir = Path(args.run_dir or ROOT / "data" / "bench" / time.strftime("%Y%m%d-%H%M%S"))
    results: dict[str, Any] = {"machine": machine(), "sizes": sizes.__dict__, "run_dir": str(run_dir),
                               "broker_save_every_change": args.broker_save_every_change}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), flush=True)
    b = Bench(run_dir).start(save_every_change=args.broker_save_every_change)
    failed = False
    try:
        for name in STAGES:
            if name not in only:
                continue
            started = time.monotonic()
            print(f"stage {name} ...", flush=True)
            try:
                results[name] = run_stage(name, b, sizes, results, args.profile)
            except Exception:
                failed = True
                results[name] = {"error": traceback.format_exc()}
                print(results[name]["error"], file=sys.stderr)
            results.setdefault("stage_seconds", {})[name] = round(time.monotonic() - started, 1)
            print(f"stage {name} done in {results['stage_seconds'][name]:.0f} s", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        b.stop()
    print("\n".join(table(results)))
    print(f"results: {args.out}; logs: {run_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
