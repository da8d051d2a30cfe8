"""The bench stages. Each takes the Bench (one broker for all) and the sizes, and returns
a dict of figures; `run.py` prints them and writes bench/results.json."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fleet_sim.synthetic import TYPES, Host
from harness import (
    BIN,
    ROOT,
    Bench,
    CpuWindow,
    Observer,
    Proc,
    client,
    connect,
    median,
    pct,
    read_commits,
    sim_stats,
    wait_until,
)

from fleet_common.brokerwatch import STORED as BROKER_STORED
from fleet_common.config import ControllerConfig, PersisterConfig
from fleet_common.messages import Status, ok_response_payload
from fleet_common.timefmt import new_id
from fleet_common.topics import Topics
from fleet_persister.persister import parse_workers


@dataclass(frozen=True)
class Sizes:
    repeats: int = 3
    ingest_repeats: int = 5  # each paired with its own raw run: the ratio the aim is about
    raw_messages: int = 20000
    ingest_backlog: int = 20000
    e2e_agents: int = 1000
    e2e_intervals: tuple[int, ...] = (16, 8, 4, 2, 1)
    e2e_min_window_s: float = 12.0
    fleet_agents: int = 10000
    fleet_interval_s: int = 60
    fleet_intervals: int = 2
    controller_agents: int = 100000
    controller_settle_s: float = 15.0
    controller_window_s: float = 60.0
    agent_seconds: float = 60.0
    profile_s: float = 30.0
    cold_agents: int = 10000
    job_agents: tuple[int, ...] = (1000, 10000)
    metrics_agents: int = 10000


TINY = Sizes(repeats=1, ingest_repeats=1, raw_messages=300, ingest_backlog=200, e2e_agents=5, e2e_intervals=(2, 1),
             e2e_min_window_s=2.0, fleet_agents=20, fleet_interval_s=2, fleet_intervals=2, controller_agents=300,
             controller_settle_s=1.0, controller_window_s=2.0, agent_seconds=3.0, profile_s=0, cold_agents=20,
             job_agents=(20,), metrics_agents=20)


def response_payload(host: Host, agent_id: str, type_: str, req_id: str) -> bytes:
    return ok_response_payload(req_id, agent_id, type_, host.reading(type_, {}), 0.5)


def _last_json(proc: Proc) -> dict[str, Any]:
    for line in reversed(proc.text().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"{proc.name} printed no result; see {proc.log_path}")


def _wait_exit(proc: Proc, timeout_s: float) -> None:
    try:
        proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"{proc.name} did not finish within {timeout_s:.0f} s; see {proc.log_path}") from None


# 1. raw ceiling ---------------------------------------------------------------------------
def raw_payloads(b: Bench) -> tuple[Path, list[int]]:
    """One real-sized answer of each type, written once where rawmqtt.py reads them, and their sizes."""
    spec = b.run_dir / "raw-payloads.json"
    if not spec.exists():
        host = Host("raw-host")
        payloads = [response_payload(host, "a0", t, new_id()).decode() for t in TYPES]
        spec.write_text(json.dumps({"payloads": payloads, "types": TYPES}))
    return spec, [len(p.encode()) for p in json.loads(spec.read_text())["payloads"]]


def raw_live_once(b: Bench, label: str, n: int) -> tuple[float, float]:
    """A paho publisher -> Mosquitto -> paho subscriber, QoS 1: (subscriber, publisher) msgs/s."""
    spec, _ = raw_payloads(b)
    ready = b.run_dir / f"raw-{label}.ready"
    sub = b.python(f"raw-sub-{label}", "rawmqtt.py", "sub", "--port", str(b.port), "--filter",
                   Topics(f"raw-{label}").all_responses(), "--count", str(n), "--ready-file", str(ready))
    wait_until(ready.exists, 20)
    p = b.python(f"raw-pub-{label}", "rawmqtt.py", "pub", "--port", str(b.port), "--topic-base", f"raw-{label}",
                 "--count", str(n), "--payloads", str(spec))
    _wait_exit(p, 300)
    _wait_exit(sub, 300)
    s, q = _last_json(sub), _last_json(p)
    return s["received"] / max(s["last"] - s["first"], 1e-9), q["acked"] / max(q["last"] - q["first"], 1e-9)


def raw(b: Bench, sizes: Sizes) -> dict[str, Any]:
    spec, sizes_b = raw_payloads(b)
    n = sizes.raw_messages
    live, pub, drain = [], [], []
    for r in range(sizes.repeats):
        sub_rate, pub_rate = raw_live_once(b, str(r), n)
        live.append(sub_rate)
        pub.append(pub_rate)
        # the same backlog, drained by a plain subscriber: the persister's ingest is the same shape
        cid = f"raw-drain-{r}"
        first = b.python(f"raw-drain-sub0-{r}", "rawmqtt.py", "sub", "--port", str(b.port), "--filter",
                         Topics(f"rawd{r}").all_responses(), "--count", "0", "--client-id", cid, "--session")
        _wait_exit(first, 30)
        p = b.python(f"raw-drain-pub-{r}", "rawmqtt.py", "pub", "--port", str(b.port), "--topic-base", f"rawd{r}",
                     "--count", str(n), "--payloads", str(spec))
        _wait_exit(p, 300)
        d = b.python(f"raw-drain-sub-{r}", "rawmqtt.py", "sub", "--port", str(b.port), "--filter",
                     Topics(f"rawd{r}").all_responses(), "--count", str(n), "--client-id", cid, "--session")
        _wait_exit(d, 300)
        s = _last_json(d)
        drain.append(s["received"] / max(s["last"] - s["first"], 1e-9))
    return {"messages_per_repeat": n, "repeats": sizes.repeats,
            "payload_bytes": dict(zip(TYPES, sizes_b)), "mean_payload_bytes": round(sum(sizes_b) / len(sizes_b)),
            "subscriber_msgs_per_s": round(median(live) or 0), "subscriber_runs": [round(x) for x in live],
            "publisher_msgs_per_s": round(median(pub) or 0),
            "backlog_drain_msgs_per_s": round(median(drain) or 0), "backlog_drain_runs": [round(x) for x in drain]}


# 2. persister ingest ----------------------------------------------------------------------
def publish_backlog(b: Bench, prefix: str, n: int) -> None:
    c = client()
    connect(c, b.port)
    acked = [0]
    c.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    c.loop_start()
    hosts = [Host(f"h{i}") for i in range(50)]
    topics = Topics(prefix)
    for i in range(n):
        t = TYPES[i % len(TYPES)]
        agent = f"h{i % 50}"
        while i - acked[0] >= 1000:
            time.sleep(0.0005)
        c.publish(topics.response(agent, t), response_payload(hosts[i % 50], agent, t, new_id()), qos=1)
    wait_until(lambda: acked[0] >= n, 120, 0.05)
    c.disconnect()
    c.loop_stop()


def ingest_once(b: Bench, name: str, n: int, persisters: int, store: dict[str, Any]) -> dict[str, Any]:
    prefix = name.replace("_", "-")
    commit_files = [b.run_dir / f"{name}-p{i}.commits" for i in range(persisters)]
    # One persister subscribes plainly (the default); several split the load on a share group,
    # whose name is a secret in a real deployment (docs/production-broker.md, "Mosquitto 2.0.11
    # behaviour worth knowing").
    share = {"shared_subscription": True, "share_group": secrets.token_urlsafe(18)} if persisters > 1 else {}
    configs = [b.config(f"{name}-p{i}", prefix, persister={**store, **share, "client_id": f"{prefix}-p{i}"})
               for i in range(persisters)]

    def start() -> list[Proc]:
        return [b.python(f"{name}-p{i}", "probe_persister.py", "--config", str(configs[i]),
                         "--commits", str(commit_files[i])) for i in range(persisters)]

    procs = start()  # once, to create the sessions that will hold the backlog
    for f in commit_files:
        wait_until(lambda f=f: bool(read_commits(f)[1]), 30)
    # A persister that has not subscribed yet gets none of the backlog: answers go out one at a
    # time until each persister has stored one.
    warm = client()
    connect(warm, b.port)
    warm.loop_start()
    host = Host("warm-up")
    for _ in range(500):
        if all(read_commits(f)[0] for f in commit_files):
            break
        warm.publish(Topics(prefix).response("warm-up", "ping"), response_payload(host, "warm-up", "ping", new_id()),
                     qos=1).wait_for_publish(10)
        time.sleep(0.05)
    else:
        raise RuntimeError(f"{name}: not every persister took a warm-up answer; see {b.run_dir}")
    warm.disconnect()
    warm.loop_stop()
    for p in procs:
        p.stop()
    for f in commit_files:
        f.unlink()
    publish_backlog(b, prefix, n)
    procs = start()
    window = CpuWindow({p.name: p for p in procs}).start()

    def committed() -> int:
        return sum(len(read_commits(f)[0]) for f in commit_files)

    done = wait_until(lambda: committed() >= n, 600, 0.2)
    cpu = window.stop()
    for p in procs:
        p.stop()
    per = [read_commits(f) for f in commit_files]
    connected = min(c[1][-1] for c in per if c[1])
    last = max(max(c[0].values()) for c in per if c[0])
    ids: Counter[str] = Counter()
    for c in per:
        ids.update(c[0].keys())
    return {"complete": done, "messages": n, "seconds": round(last - connected, 2),
            "msgs_per_s": round(n / max(last - connected, 1e-9)), "per_persister": [len(c[0]) for c in per],
            "stored_twice": sum(1 for v in ids.values() if v > 1), "cpu": cpu}


def ingest(b: Bench, sizes: Sizes, raw_result: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stores: list[tuple[str, dict[str, Any]]] = [("sqlite", {"store": "sqlite"})]
    mongo = os.environ.get("FLEET_BENCH_MONGODB_URI")
    if mongo:
        stores.append(("mongodb", {"store": "mongodb", "mongodb_uri": mongo, "mongodb_database": "fleet_bench"}))
    else:
        out["mongodb"] = "not measured: set FLEET_BENCH_MONGODB_URI to a real MongoDB (mongomock is no measure)"
    # One persister as configured by default (parse workers on the cores beyond the first); then
    # one and two that parse on their network threads: on these 2 cores, two persisters with a
    # worker each would be four busy processes, so the scale-out is shown with one core each.
    variants = [(1, None), (1, 0), (2, 0)]
    for label, store in stores:
        for persisters, workers in variants:
            repeats = sizes.ingest_repeats
            runs = []
            setting = {} if workers is None else {"parse_workers": workers}
            key = f"{label}_{persisters}_persister{'s' if persisters > 1 else ''}" + \
                ("" if workers is None else f"_parse_workers_{workers}")
            for r in range(repeats):
                if label == "sqlite":
                    store = {**store, "sqlite_path": str(b.run_dir / f"ingest-{key}-{r}.db")}
                # This machine's speed drifts over minutes; each run gets its own raw figure, taken
                # just before it, and the ratio is the median of those pairs.
                name = f"ingest_{key}_{r}"
                reference, _ = raw_live_once(b, name, sizes.raw_messages)
                run = ingest_once(b, name, sizes.ingest_backlog, persisters, {**store, **setting})
                run["raw_subscriber_msgs_per_s_just_before"] = round(reference)
                run["ratio_to_that_raw"] = round(run["msgs_per_s"] / max(reference, 1e-9), 2)
                runs.append(run)
            rate = median(r["msgs_per_s"] for r in runs) or 0
            fig: dict[str, Any] = {"msgs_per_s": round(rate), "runs": runs,
                                   "parse_workers": parse_workers(PersisterConfig(parse_workers=workers)),
                                   "ratio_to_raw_paired": median(r["ratio_to_that_raw"] for r in runs)}
            if raw_result:
                fig["ratio_to_raw_subscriber"] = round(rate / raw_result["subscriber_msgs_per_s"], 2)
                fig["ratio_to_raw_backlog_drain"] = round(rate / raw_result["backlog_drain_msgs_per_s"], 2)
            out[key] = fig
        one, two = out.get(f"{label}_1_persister_parse_workers_0"), out.get(f"{label}_2_persisters_parse_workers_0")
        if one and two and one["msgs_per_s"]:
            out[f"{label}_two_persisters_over_one"] = round(two["msgs_per_s"] / one["msgs_per_s"], 2)
    return out


# 3 and 4: the whole system ------------------------------------------------------------------
UNPACED = 1_000_000  # controller.max_dispatch_per_s for stages that measure what the system can take
class Stack:
    """Simulator + probe persister + request observer on one prefix; controllers come and go."""

    def __init__(self, b: Bench, name: str, agents: int) -> None:
        self.b, self.name, self.agents = b, name, agents
        self.cfg = b.config(f"{name}-sim", name)
        self.stats_file = b.run_dir / f"{name}-sim.json"
        self.commits = b.run_dir / f"{name}.commits"
        self.sim = b.service(f"{name}-sim", "fleet-sim", self.cfg, "--agents", str(agents), "--id-prefix", name,
                             "--stats-file", str(self.stats_file), "--stats-every-s", "5")
        if not wait_until(lambda: sim_stats(self.stats_file).get("all_connected_after_s") is not None, 120):
            raise RuntimeError(f"the simulator did not connect {agents} agents; see {self.sim.log_path}")
        self.connect_s = sim_stats(self.stats_file)["all_connected_after_s"]
        self.persister = b.python(f"{name}-persister", "probe_persister.py", "--config", str(self.cfg),
                                  "--commits", str(self.commits))
        wait_until(lambda: bool(read_commits(self.commits)[1]), 30)
        self.observer = Observer(b.port, Topics(name).all_requests())

    def controller(self, label: str, interval_s: int, budget_per_s: int | None = None) -> Proc:
        settings: dict[str, Any] = {"schedule": {t: interval_s for t in TYPES}, "tick_s": 0.1}
        if budget_per_s is not None:
            settings["max_dispatch_per_s"] = budget_per_s
        cfg = self.b.config(f"{self.name}-ctl-{label}", self.name, controller=settings)
        return self.b.service(f"{self.name}-controller-{label}", "fleet-controller", cfg)

    def first_request_after(self, t: float, timeout_s: float = 30) -> float:
        def first() -> float | None:
            for arrived, _ in self.observer.messages[-1:]:
                if arrived >= t:
                    return arrived
            return None
        wait_until(lambda: first() is not None, timeout_s, 0.05)
        return first() or time.time()

    def settle(self, quiet_s: float = 2.0, timeout_s: float = 60) -> None:
        """Wait until nothing new has been committed for quiet_s."""
        last = [0, time.monotonic()]

        def quiet() -> bool:
            n = os.path.getsize(self.commits) if self.commits.exists() else 0
            if n != last[0]:
                last[0], last[1] = n, time.monotonic()
            return time.monotonic() - last[1] >= quiet_s
        wait_until(quiet, timeout_s, 0.2)

    def measure(self, t0: float, t1: float, interval_s: int) -> dict[str, Any]:
        commits, _ = read_commits(self.commits)
        reqs = [r for r in self.observer.requests() if t0 <= r[1] < t1]
        lat, in_time, stored = [], 0, 0
        for id_, issued, expires, _ in reqs:
            at = commits.get(id_)
            if at is None:
                continue
            stored += 1
            lat.append((at - issued) * 1000.0)
            in_time += at <= expires
        n = len(reqs)
        per_s = Counter(int(r[1]) for r in reqs)
        full = [per_s.get(s, 0) for s in range(int(t0) + 1, int(t1))]
        thirds = []
        span = (t1 - t0) / 3
        req_ids = {r[0] for r in reqs}
        stamps = sorted(commits[i] for i in req_ids if i in commits)
        for k in range(3):
            lo = t0 + k * span + (median([x / 1000 for x in lat]) or 0)
            thirds.append(sum(1 for s in stamps if lo <= s < lo + span) / span)
        return {"requests": n, "offered_per_s": round(n / (t1 - t0), 1), "stored": stored,
                "stored_in_time": in_time, "stored_share": round(stored / n, 5) if n else None,
                "in_time_share": round(in_time / n, 5) if n else None,
                "stored_per_s": round(median(thirds) or 0, 1), "latency_ms_p50": _r(pct(lat, 50)),
                "latency_ms_p99": _r(pct(lat, 99)), "latency_ms_max": _r(max(lat) if lat else None),
                "peak_dispatch_per_s": max(full) if full else None,
                "even_share_per_s": round(self.agents * len(TYPES) / interval_s, 1)}

    def stop(self) -> None:
        self.observer.stop()
        self.sim.stop(30)
        self.persister.stop(30)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def end_to_end(b: Bench, sizes: Sizes, raw_result: dict[str, Any] | None) -> dict[str, Any]:
    stack = Stack(b, "e2e", sizes.e2e_agents)
    steps = []
    try:
        for interval in sizes.e2e_intervals:
            window_s = max(float(interval), sizes.e2e_min_window_s)
            # the dispatch budget out of the way: this stage looks for the system's own ceiling
            ctl = stack.controller(f"{interval}s", interval, budget_per_s=UNPACED)
            t0 = stack.first_request_after(time.time()) + 0.5
            time.sleep(max(0.0, t0 + window_s - time.time()))
            ctl.stop()
            stack.settle()
            step = stack.measure(t0, t0 + window_s, interval)
            step["interval_s"] = interval
            # keeping up: (nearly) every answer stored, and no queue building up behind them
            step["keeps_up"] = bool(step["stored_share"] and step["stored_share"] >= 0.99
                                    and (step["latency_ms_p99"] or 1e9) <= 2000)
            steps.append(step)
            if not step["keeps_up"]:
                break
    finally:
        stack.stop()
    ok = [s for s in steps if s["keeps_up"]]
    best = max(ok, key=lambda s: s["stored_per_s"]) if ok else None
    half = None
    if best is not None:
        target = best["offered_per_s"] / 2
        half = min((s for s in steps if s is not best), key=lambda s: abs(s["offered_per_s"] - target), default=None)
    out: dict[str, Any] = {"agents": sizes.e2e_agents, "steps": steps,
                           "max_sustained_stored_per_s": best["stored_per_s"] if best else None,
                           "at_max": _pick(best), "at_half": _pick(half),
                           "criterion": ">= 99% of answers stored and p99 request-to-stored <= 2 s"}
    if best and raw_result:
        out["ratio_to_raw_subscriber"] = round(2 * best["stored_per_s"] / raw_result["subscriber_msgs_per_s"], 2)
        out["ratio_note"] = "2 messages (request + answer) reach the persister per stored answer"
    return out


def _pick(step: dict[str, Any] | None) -> dict[str, Any] | None:
    if step is None:
        return None
    return {k: step[k] for k in ("offered_per_s", "stored_per_s", "latency_ms_p50", "latency_ms_p99", "interval_s")}


def fleet(b: Bench, sizes: Sizes, profile: bool) -> dict[str, Any]:
    stack = Stack(b, "fleet", sizes.fleet_agents)
    interval = sizes.fleet_interval_s
    profiles: dict[str, Any] = {}
    try:
        ctl = stack.controller("main", interval)
        t0 = stack.first_request_after(time.time()) + 0.5
        broker = _BrokerProc(b)
        window = CpuWindow({"simulator": stack.sim, "persister": stack.persister, "controller": ctl,
                            "mosquitto": broker}).start()  # type: ignore[dict-item]
        t1 = t0 + interval * sizes.fleet_intervals
        if profile and sizes.profile_s > 0:
            profiles = _profile(b, {"simulator": stack.sim, "persister": stack.persister, "controller": ctl},
                                min(sizes.profile_s, t1 - time.time() - 5))
        time.sleep(max(0.0, t1 - time.time()))
        cpu = window.stop()
        ctl.stop()
        stack.settle(quiet_s=3.0)
        total = stack.measure(t0, t1, interval)
        per_interval = [stack.measure(t0 + k * interval, t0 + (k + 1) * interval, interval)
                        for k in range(sizes.fleet_intervals)]
    finally:
        stack.stop()
    even = total["even_share_per_s"]
    return {"agents": sizes.fleet_agents, "types": len(TYPES), "interval_s": interval,
            "intervals": sizes.fleet_intervals, "sim_connect_s": stack.connect_s, **total,
            "in_time_share_per_interval": [p["in_time_share"] for p in per_interval],
            "peak_over_even": round(total["peak_dispatch_per_s"] / even, 2) if total["peak_dispatch_per_s"] else None,
            "cpu": cpu, "profile": profiles}


class _BrokerProc:
    def __init__(self, b: Bench) -> None:
        self.b = b

    def cpu_s(self) -> float:
        return self.b.broker_cpu_s()

    def rss(self) -> int:
        return int(self.b.broker_rss_mb() * 2**20)


def _profile(b: Bench, procs: dict[str, Proc], seconds: float) -> dict[str, Any]:
    """py-spy (sampling, from outside) on each process at once; the top functions by own time."""
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not os.path.exists(spy) or seconds < 5:
        return {"skipped": "py-spy is not installed" if seconds >= 5 else "window too short"}
    runs = {}
    for name, p in procs.items():
        out = b.run_dir / f"profile-{name}.txt"
        runs[name] = (out, subprocess.Popen([spy, "record", "--format", "raw", "--rate", "50", "--nonblocking",
                                             "-d", str(int(seconds)), "-o", str(out), "-p", str(p.popen.pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    result = {}
    for name, (out, proc) in runs.items():
        proc.wait(seconds + 30)
        result[name] = top_frames(out)
    return result


def top_frames(path: Path, n: int = 12) -> dict[str, Any]:
    """Own-time share of the hottest functions in a py-spy raw (collapsed stacks) file."""
    own: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"file": str(path), "samples": 0}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        own[leaf] += int(count)
        total += int(count)
    return {"file": str(path), "samples": total,
            "top_own_pct": [(f, round(100 * c / total, 1)) for f, c in own.most_common(n)] if total else []}


# 5. controller at 100,000 agents --------------------------------------------------------------
ROLES = ("web", "db", "build")


def _publish_fleet(b: Bench, topics: Topics, n: int, labelled: bool = False) -> float:
    """n retained births (syn-000000 ...), with `labelled` a third each of role web, db and build
    (ROLES); seconds it took. At most 1000 wait for the broker's acknowledgement."""
    c = client()
    connect(c, b.port)
    acked = [0]
    c.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    c.loop_start()
    started = time.monotonic()
    for i in range(n):
        agent = f"syn-{i:06d}"
        status = Status(agent_id=agent, online=True, hostname=agent, platform="Linux", agent_version="0.1.0",
                        types=list(TYPES), labels={"role": ROLES[i % 3]} if labelled else None)
        while i - acked[0] >= 1000:
            time.sleep(0.0005)
        c.publish(topics.status(agent), status.payload(), qos=1, retain=True)
    wait_until(lambda: acked[0] >= n, 120, 0.05)
    c.disconnect()
    c.loop_stop()
    return time.monotonic() - started


def controller(b: Bench, sizes: Sizes) -> dict[str, Any]:
    prefix = "ctl100k"
    topics = Topics(prefix)
    n = sizes.controller_agents
    publish_s = _publish_fleet(b, topics, n)

    seen: set[str] = set()
    count = [0]
    lock = threading.Lock()
    obs = client()

    def on_message(cl: Any, ud: Any, msg: Any) -> None:
        with lock:
            count[0] += 1
            seen.add(topics.parse(msg.topic).agent_id)

    obs.on_message = on_message
    obs.on_connect = lambda cl, *a: cl.subscribe(topics.all_requests(), qos=0)
    connect(obs, b.port)
    obs.loop_start()
    cfg = b.config("ctl100k", prefix, log={"level": "info"}, controller={"max_dispatch_per_s": UNPACED})
    ctl = b.service("ctl100k-controller", "fleet-controller", cfg)
    try:
        time.sleep(sizes.controller_settle_s)  # it learns the fleet from the retained statuses
        rss_learned = ctl.rss()
        window = CpuWindow({"controller": ctl}).start()
        with lock:
            count[0] = 0
            seen.clear()
        time.sleep(sizes.controller_window_s)
        cpu = window.stop()["controller"]
        with lock:
            requests, asked = count[0], len(seen)
    finally:
        ctl.stop()
        obs.disconnect()
        obs.loop_stop()
    per_interval = cpu["cpu_s"] * 60.0 / sizes.controller_window_s
    return {"agents": n, "schedule": "default (cpu, memory, network, ping 60 s; disk, processes 300 s; os_info 3600 s)",
            "status_publish_s": round(publish_s, 1), "window_s": sizes.controller_window_s,
            "agents_asked_in_window": asked, "requests_in_window": requests,
            "requests_per_s": round(requests / sizes.controller_window_s),
            "cpu_s_per_60s_interval": round(per_interval, 2), "cpu_pct_of_core": cpu["cpu_pct_of_core"],
            "cpu_us_per_request": round(1e6 * cpu["cpu_s"] / requests, 1) if requests else None,
            "rss_mb_after_learning": round(rss_learned / 2**20, 1), "peak_rss_mb": cpu["peak_rss_mb"]}


# 6. agent footprint ---------------------------------------------------------------------------
def agent_install(b: Bench) -> tuple[list[str], str]:
    """fleet-agent as a host has it: a virtual environment with fleet-common, fleet-agent and their
    dependencies only. The development one also holds what the services need (pymongo brings
    dnspython, which paho then imports), and that would be counted against the agent."""
    venv = b.run_dir / "agent-venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT / "common"),
                        str(ROOT / "agent")], check=True, capture_output=True, timeout=600)
        listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                                check=True, capture_output=True, text=True, timeout=60).stdout.split()
        return [str(venv / "bin" / "fleet-agent")], "agent-only environment: " + ", ".join(listed)
    except (OSError, subprocess.SubprocessError) as exc:
        return [str(BIN / "fleet-agent")], f"development environment (no agent-only one: {exc})"


def agent(b: Bench, sizes: Sizes) -> dict[str, Any]:
    prefix = "agentfp"
    command, installed = agent_install(b)
    cfg = b.config("agentfp", prefix, agent={"id": "bench-agent", "outbox_path": str(b.run_dir / "outbox.db")},
                   controller={"schedule": {t: 1 for t in TYPES}, "tick_s": 0.1})
    ag = b.start_proc("agentfp-agent", [*command, "--config", str(cfg)])
    obs = Observer(b.port, Topics(prefix).all_responses())
    try:
        wait_until(lambda: ag.text().count("connected to broker") > 0, 20)
        ctl = b.service("agentfp-controller", "fleet-controller", cfg)
        wait_until(lambda: len(obs.messages) >= len(TYPES), 20, 0.05)
        time.sleep(2)  # the first answers prime psutil's counters
        t0 = time.time()
        minutes: list[float] = []  # one figure per agent_seconds window, `repeats` of them
        rss = []
        for _ in range(sizes.repeats):
            w = CpuWindow({"agent": ag}).start()
            started = time.time()
            while time.time() - started < sizes.agent_seconds - 0.01:
                time.sleep(1)
                rss.append(ag.rss())
            minutes.append(w.stop()["agent"]["cpu_pct_of_core"])
        t1 = time.time()
        ctl.stop()
    finally:
        obs.stop()
        ag.stop()
    durations: dict[str, list[float]] = {t: [] for t in TYPES}
    for arrived, payload in obs.messages:
        if t0 <= arrived < t1:
            obj = json.loads(payload)
            if obj.get("status") == "ok" and obj.get("duration_ms") is not None:
                durations[obj["type"]].append(float(obj["duration_ms"]))
    return {"installed": installed, "seconds": round(t1 - t0, 1),
            "rss_mb_max": round(max(rss) / 2**20, 1) if rss else None,
            "rss_mb_median": round((median(rss) or 0) / 2**20, 1), "cpu_pct_of_core": median(minutes),
            "cpu_pct_of_core_runs": minutes, "window_s": sizes.agent_seconds,
            "collection_ms": {t: {"n": len(v), "p50": _r(pct(v, 50)), "p99": _r(pct(v, 99))}
                              for t, v in durations.items()}}


# 7. cold start ------------------------------------------------------------------------------
class RequestLog:
    """Every request on `<prefix>/+/req/+`: (arrival, agent, type, id); and the most messages the
    broker held, from its $SYS tree (the bench broker publishes it every second)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.seen: list[tuple[float, str, str, str]] = []
        self.stored_max = 0
        self._topics = Topics(prefix)
        self.c = client()
        self.c.on_message = self._on_message
        self.c.on_connect = lambda cl, *a: cl.subscribe([(self._topics.all_requests(), 1), (BROKER_STORED, 0)])
        connect(self.c, port)
        self.c.loop_start()

    def _on_message(self, cl: Any, ud: Any, msg: Any) -> None:
        if msg.topic == BROKER_STORED:
            self.stored_max = max(self.stored_max, int(msg.payload or 0))
            return
        topic = self._topics.parse(msg.topic)
        self.seen.append((time.time(), topic.agent_id, topic.type or "", json.loads(msg.payload)["id"]))

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def all_seven_at(log: RequestLog, commits: dict[str, float], agents: int) -> float | None:
    """When the last agent had an answer of every type stored, or None if not yet."""
    first: dict[tuple[str, str], float] = {}
    for _, agent, type_, id_ in list(log.seen):
        at = commits.get(id_)
        if at is not None and at < first.get((agent, type_), float("inf")):
            first[agent, type_] = at
    if len(first) < agents * len(TYPES):
        return None
    return max(first.values())


def cold_start(b: Bench, sizes: Sizes) -> dict[str, Any]:
    """A fleet coming online all at once in front of a running controller and persister, as
    configured by default: how fast requests go out against the budget, the most messages the
    broker held, how long until every agent has all seven answers stored, and what expired."""
    name, n = "cold", sizes.cold_agents
    cfg = b.config(name, name, log={"level": "info"})
    budget = ControllerConfig().max_dispatch_per_s
    commits = b.run_dir / f"{name}.commits"
    persister = b.python(f"{name}-persister", "probe_persister.py", "--config", str(cfg), "--commits", str(commits))
    wait_until(lambda: bool(read_commits(commits)[1]), 30)
    ctl = b.service(f"{name}-controller", "fleet-controller", cfg)
    wait_until(lambda: "watching agent status" in ctl.text(), 30)
    log = RequestLog(b.port, name)
    stats = b.run_dir / f"{name}-sim.json"
    started = time.time()
    sim = b.service(f"{name}-sim", "fleet-sim", cfg, "--agents", str(n), "--id-prefix", name,
                    "--stats-file", str(stats), "--stats-every-s", "5")
    try:
        wait_until(lambda: sim_stats(stats).get("all_connected_after_s") is not None, 120)
        done = wait_until(lambda: all_seven_at(log, read_commits(commits)[0], n) is not None, 900, 1.0)
        ctl.stop()
        time.sleep(8)  # past the persister's expiry grace: a request left unanswered is expired now
        finished = all_seven_at(log, read_commits(commits)[0], n)
    finally:
        sim.stop(30)
        persister.stop(30)
        log.stop()
    per_s = Counter(int(arrived) for arrived, *_ in log.seen)
    first_round = Counter(int(arrived - started) // 10 for arrived, *_ in log.seen)
    states = _states(b.run_dir / f"{name}.db")
    return {"agents": n, "budget_per_s": budget, "sim_connect_s": sim_stats(stats).get("all_connected_after_s"),
            "requests": len(log.seen), "peak_requests_per_s": max(per_s.values()) if per_s else None,
            "broker_stored_max": log.stored_max, "complete": done,
            "all_seven_stored_after_s": round(finished - started, 1) if finished else None,
            "expired": states.get("expired", 0), "pending": states.get("pending", 0), "states": states,
            "requests_per_s_by_10s": [round(first_round.get(k, 0) / 10)
                                      for k in range(max(first_round, default=-1) + 1)]}


def _states(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT state, COUNT(*) FROM requests GROUP BY state")
        return {state: int(count) for state, count in rows}
    finally:
        con.close()


# 8. jobs -----------------------------------------------------------------------------------------
JOB_FIGURES = ("fleet_read_s", "send_s", "last_answer_after_first_send_s", "after_last_answer_s", "total_s",
               "peak_publish_per_s", "rss_growth_mb")


def job(b: Bench, sizes: Sizes) -> dict[str, Any]:
    """`fleetctl request --all ping` to a simulated fleet of each size in sizes.job_agents, as
    fleet_common.jobrun runs it, in a process of its own (bench/job_client.py): how long it takes
    to send, how soon after the last answer the wait ends, its peak publish rate, and how much its
    memory grows (per agent: linear if the figure holds from one size to the next). Medians of
    sizes.repeats jobs per size."""
    out: dict[str, Any] = {"sizes": {}}
    for n in sizes.job_agents:
        prefix = f"job{n}"
        cfg = b.config(f"{prefix}-sim", prefix)
        stats = b.run_dir / f"{prefix}-sim.json"
        sim = b.service(f"{prefix}-sim", "fleet-sim", cfg, "--agents", str(n), "--id-prefix", prefix,
                        "--types", "ping", "--stats-file", str(stats), "--stats-every-s", "5")
        try:
            if not wait_until(lambda path=stats: sim_stats(path).get("all_connected_after_s") is not None, 180):
                raise RuntimeError(f"the simulator did not connect {n} agents; see {sim.log_path}")
            runs = []
            for k in range(sizes.repeats):
                proc = b.python(f"{prefix}-job-{k}", "job_client.py", "--config", str(cfg))
                _wait_exit(proc, 120)
                runs.append(_last_json(proc))
        finally:
            sim.stop(30)
        fig: dict[str, Any] = {"agents": n, "runs": runs, "all_answered": all(r["ok"] == n for r in runs)}
        fig.update({k: median(r[k] for r in runs) for k in JOB_FIGURES})
        fig["rss_growth_kb_per_agent"] = round(1024 * fig["rss_growth_mb"] / n, 2)
        out["sizes"][str(n)] = fig
    return out
# 9. controller groups and a reload at 100,000 agents ---------------------------------------------
GROUPS_BEFORE = [{"match": {"role": "db"}, "schedule": {"processes": 60}},
                 {"match": {"role": "build"}, "schedule": {"processes": 0}}]
GROUPS_AFTER = [{"match": {"role": "db"}, "schedule": {"processes": 120}},
                {"match": {"role": "build"}, "schedule": {"disk": 60}}]


def groups(b: Bench, sizes: Sizes) -> dict[str, Any]:
    """The controller stage with labels and controller.groups (db agents' processes every minute,
    build agents' never), then a SIGHUP that changes the groups: CPU and RSS as the controller
    stage measures them, how long the reload took, and the busiest second after it against the
    steady rate (a burst would show there)."""
    prefix = "grp100k"
    topics = Topics(prefix)
    n = sizes.controller_agents
    publish_s = _publish_fleet(b, topics, n, labelled=True)
    per_second: Counter[int] = Counter()
    lock = threading.Lock()
    obs = client()

    def on_message(cl: Any, ud: Any, msg: Any) -> None:
        with lock:
            per_second[int(time.time())] += 1

    obs.on_message = on_message
    obs.on_connect = lambda cl, *a: cl.subscribe(topics.all_requests(), qos=0)
    connect(obs, b.port)
    obs.loop_start()
    cfg = b.config("grp100k", prefix, log={"level": "info"},
                   controller={"max_dispatch_per_s": UNPACED, "groups": GROUPS_BEFORE})
    ctl = b.service("grp100k-controller", "fleet-controller", cfg)
    try:
        time.sleep(sizes.controller_settle_s)
        window = CpuWindow({"controller": ctl}).start()
        t0 = time.time()
        time.sleep(sizes.controller_window_s)
        cpu = window.stop()["controller"]
        t1 = time.time()
        data = yaml.safe_load(cfg.read_text())
        data["controller"]["groups"] = GROUPS_AFTER
        cfg.write_text(yaml.safe_dump(data))
        hup = time.time()
        ctl.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded the schedule in" in ctl.text(), 60, 0.05)
        reloaded = re.search(r"reloaded the schedule in (\d+) ms", ctl.text())
        time.sleep(5.0)
    finally:
        ctl.stop()
        obs.disconnect()
        obs.loop_stop()
    with lock:
        steady = sum(c for s, c in per_second.items() if int(t0) < s < int(t1)) / max(1, int(t1) - int(t0) - 1)
        after = [per_second.get(s, 0) for s in range(int(hup), int(hup) + 5)]
    return {"agents": n, "groups_before": GROUPS_BEFORE, "groups_after": GROUPS_AFTER,
            "status_publish_s": round(publish_s, 1), "window_s": sizes.controller_window_s,
            "requests_per_s": round(steady), "cpu_s_per_60s_interval": round(cpu["cpu_s"] * 60.0 /
                                                                             sizes.controller_window_s, 2),
            "cpu_pct_of_core": cpu["cpu_pct_of_core"], "peak_rss_mb": cpu["peak_rss_mb"],
            "reload_ms": int(reloaded[1]) if reloaded else None,
            "requests_per_s_after_reload": after,
            "busiest_second_after_reload_over_steady": round(max(after) / steady, 2) if steady and after else None}


# 10. Prometheus exposition ----------------------------------------------------------------------
def metrics(sizes: Sizes) -> dict[str, Any]:
    """/metrics at fleet size (bench/metrics.py): needs no broker, only a store."""
    import metrics as bench_metrics

    return bench_metrics.measure(sizes.metrics_agents, answers=2 if sizes.metrics_agents < 100 else 10)
