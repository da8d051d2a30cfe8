"""/metrics over a real SQLite store, through Flask's test client: its values are the newest stored
answers, values older than three intervals of their type are left out, a scrape never reads the
store, and the token and the on/off default hold."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from strategies import conforming

from fleet_common import Request, Response, Status, iso
from fleet_common.config import Config, ConfigError, load_config
from fleet_common.datatypes import BUILTIN as DATATYPES
from fleet_common.timefmt import parse_iso
from fleet_dashboard.app import create_app
from fleet_dashboard.exposition import Exposition, exposed_names, info_labels
from fleet_store import AgentRecord, Batch, Incoming
from fleet_store.mongodb import MongoStore
from fleet_store.sqlite import SqliteStore

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
VALUE_TYPES = ("cpu", "memory", "disk", "network", "processes")


def answer(store: SqliteStore, agent: str, type_: str, data: dict[str, Any], at: float, n: int = 0) -> None:
    rid = f"{agent}-{type_}-{n}"
    store.write(Batch(requests=[Incoming(Request(id=rid, type=type_, issued_at=iso(at), expires_at=iso(at + 60)),
                                         agent, iso(at))],
                      responses=[Incoming(Response(id=rid, agent_id=agent, type=type_, status="ok", data=data,
                                                   collected_at=iso(at + 0.02)), agent, iso(at + 0.05))]))


def hello(store: SqliteStore, agent: str, online: bool, at: float) -> None:
    store.write(Batch(statuses=[Incoming(Status(agent_id=agent, online=online, ts=iso(at), hostname=f"{agent}.lan",
                                                platform="Linux-6.1-x86_64", agent_version="0.1.0"),
                                         agent, iso(at))]))


def config(tmp_path: Path, **dashboard: Any) -> Config:
    return load_config(None, env={"FLEET_PERSISTER_SQLITE_PATH": str(tmp_path / "fleet.db")}).replace(
        "dashboard", **dashboard)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(cfg: Config, store: SqliteStore, **headers: str) -> Samples:
    resp = create_app(cfg, store).test_client().get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return parse(resp.get_data(as_text=True))


def of(samples: Samples, agent: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(name, labels - {("agent_id", agent)}): v for (name, labels), v in samples.items()
            if ("agent_id", agent) in labels and name != "fleet_agent_info"}


def expected(store: SqliteStore, agent: str, now: float, schedule: dict[str, int]) -> Samples:
    """What /metrics should say of `agent`, worked out here from its newest stored answers."""
    out: Samples = {}

    def put(name: str, value: Any, **labels: str) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault((name, frozenset(labels.items())), float(value))

    newest = {}
    for type_ in schedule:
        rec = next((r for r in store.history(agent, type_, limit=50) if r.state == "ok"), None)
        if rec is not None and rec.answered_at is not None and now - parse_iso(rec.answered_at) <= 3 * schedule[type_]:
            newest[type_] = rec.data or {}
            put("fleet_answer_age_seconds", now - parse_iso(rec.answered_at), type=type_)
    cpu, mem, disk, net, procs = (newest.get(t) for t in VALUE_TYPES)
    if cpu is not None:
        put("fleet_cpu_percent", cpu["percent"])
        for n, value in zip((1, 5, 15), cpu.get("load_avg") or []):
            put(f"fleet_load{n}", value)
    if mem is not None:
        put("fleet_memory_used_percent", mem["virtual"]["percent"])
        put("fleet_memory_available_bytes", mem["virtual"].get("available"))
        put("fleet_swap_used_percent", (mem.get("swap") or {}).get("percent"))
    mounts = {}  # the first of each mount point and interface name: bind mounts repeat one
    for part in (disk or {}).get("partitions", []):
        mounts.setdefault(part["mountpoint"], part)
    for mount, part in mounts.items():
        put("fleet_disk_used_percent", part["percent"], mountpoint=mount)
        put("fleet_disk_free_bytes", part["free"], mountpoint=mount)
    nics = {}
    for nic in (net or {}).get("interfaces", []):
        nics.setdefault(nic["name"], nic)
    for name, nic in nics.items():
        put("fleet_network_receive_bytes_total", nic["bytes_recv"], interface=name)
        put("fleet_network_transmit_bytes_total", nic["bytes_sent"], interface=name)
    if procs is not None:
        put("fleet_process_count", procs.get("total"))
    return out


def without_ages(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0] not in ("fleet_answer_age_seconds",)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "fleet.db"))
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "mongodb"], ids=["sqlite", "mongodb[mongomock]"])
def either(request: pytest.FixtureRequest, tmp_path: Path, mongomock_accepts_sort: None) -> Iterator[Any]:
    """Each store the dashboard reads: SQLite, and MongoDB through mongomock."""
    if request.param == "sqlite":
        s: Any = SqliteStore(str(tmp_path / "fleet.db"))
    else:
        s = MongoStore(mongomock.MongoClient(), database="fleet_test")
    yield s
    s.close()


def test_the_values_are_the_newest_stored_answers_and_stale_ones_are_left_out(tmp_path: Path, either: Any) -> None:
    """Each metric is the agent's newest answer of its type, on either store; one answered more than
    three intervals of its type ago (cpu every 60 s, disk every 300 s) is not shown at all."""
    store = either
    now = time.time()
    hello(store, "web-01", True, now - 10)
    hello(store, "old-01", True, now - 10)
    for n, at in enumerate((now - 170, now - 110, now - 50)):  # the newest wins, not the first or largest
        answer(store, "web-01", "cpu", {"percent": 90.0 - n, "load_avg": [1.0 + n, 2.0, 3.0]},
               at, n)
    answer(store, "web-01", "memory", {"virtual": {"percent": 40.0, "available": 6 << 30}, "swap": {"percent": 1.5}},
           now - 30)
    answer(store, "web-01", "disk", {"partitions": [
        {"device": "/dev/sda1", "mountpoint": "/", "fstype": "ext4", "percent": 91.5, "free": 10 << 30},
        {"device": "/dev/sda1", "mountpoint": "/", "fstype": "ext4", "percent": 91.5, "free": 10 << 30},  # bind
        {"device": "/dev/sdb1", "mountpoint": "/var", "fstype": "ext4", "percent": 20.0, "free": None}]}, now - 800)
    answer(store, "web-01", "network", {"interfaces": [{"name": "eth0", "bytes_recv": 123456789, "bytes_sent": 42},
                                                       {"name": "lo", "bytes_recv": 7, "bytes_sent": 7}]}, now - 40)
    answer(store, "web-01", "processes", {"processes": [{"pid": 1}], "total": 92}, now - 60)
    answer(store, "old-01", "cpu", {"percent": 12.0, "load_avg": None}, now - 181)  # 3 intervals and a second
    answer(store, "old-01", "disk", {"partitions": [{"mountpoint": "/", "percent": 50.0, "free": 1}]}, now - 901)
    answer(store, "old-01", "memory", {"virtual": {"percent": 33.0, "available": 1}, "swap": None}, now - 175)

    cfg = config(tmp_path)
    got = scrape(cfg, store)
    schedule = cfg.controller.schedule
    for agent in ("web-01", "old-01"):
        want = expected(store, agent, time.time(), schedule)
        mine = of(got, agent)
        assert without_ages(mine) == without_ages(want) | {("fleet_agent_online", frozenset()): 1.0,
                                                           ("fleet_requests_answered_ratio", frozenset()): 1.0}
        ages = {k: v for k, v in mine.items() if k[0] == "fleet_answer_age_seconds"}
        assert ages.keys() == {k for k in want if k[0] == "fleet_answer_age_seconds"}
        for key, age in ages.items():  # as of the snapshot, taken between the writes and now
            assert 0 <= want[key] - age <= time.time() - now + 1
    web = of(got, "web-01")
    assert web[("fleet_cpu_percent", frozenset())] == 88.0
    assert web[("fleet_disk_used_percent", frozenset({("mountpoint", "/")}))] == 91.5
    assert ("fleet_disk_free_bytes", frozenset({("mountpoint", "/var")})) not in web  # null: no reading
    old = of(got, "old-01")
    assert ("fleet_cpu_percent", frozenset()) not in old and ("fleet_disk_used_percent", frozenset(
        {("mountpoint", "/")})) not in old
    assert old[("fleet_memory_used_percent", frozenset())] == 33.0


def test_online_info_and_answered_ratio(tmp_path: Path, store: SqliteStore) -> None:
    """fleet_agent_online is 1 only for an agent the dashboard calls online; fleet_agent_info is 1 and
    carries host name, platform and version; the answered ratio counts the window's requests."""
    now = time.time()
    hello(store, "up-01", True, now - 5)
    hello(store, "gone-01", False, now - 5)
    hello(store, "quiet-01", True, now - 3600)  # silent: online by its status, not heard for an hour
    answer(store, "up-01", "ping", {}, now - 20, 0)
    store.write(Batch(requests=[Incoming(Request(id="p1", type="ping", issued_at=iso(now - 10),
                                                 expires_at=iso(now + 50)), "up-01", iso(now - 10))]))
    got = scrape(config(tmp_path), store)
    assert {a: got[("fleet_agent_online", frozenset({("agent_id", a)}))] for a in ("up-01", "gone-01", "quiet-01")} \
        == {"up-01": 1.0, "gone-01": 0.0, "quiet-01": 0.0}
    assert got[("fleet_agent_info", frozenset({("agent_id", "up-01"), ("hostname", "up-01.lan"),
                                               ("platform", "Linux-6.1-x86_64"), ("agent_version", "0.1.0")}))] == 1
    assert got[("fleet_requests_answered_ratio", frozenset({("agent_id", "up-01")}))] == 0.5
    assert not any(k[0] == "fleet_requests_answered_ratio" and ("agent_id", "gone-01") in k[1] for k in got)


def test_agent_labels_become_prometheus_labels_except_those_that_clash(tmp_path: Path, store: SqliteStore) -> None:
    """An agent's labels, from its birth, join fleet_agent_info as they are; one that would hide a
    fixed label, or that Prometheus could not take, is left out."""
    now = time.time()
    store.write(Batch(statuses=[Incoming(Status(agent_id="a-1", online=True, ts=iso(now), hostname="h",
                                                platform="Linux", agent_version="0.1.0",
                                                labels={"role": "web", "site": "ams", "hostname": "fake"}),
                                         "a-1", iso(now))]))
    info = [labels for (name, labels) in scrape(config(tmp_path), store) if name == "fleet_agent_info"]
    assert info == [frozenset({("agent_id", "a-1"), ("hostname", "h"), ("platform", "Linux"),
                               ("agent_version", "0.1.0"), ("role", "web"), ("site", "ams")})]
    odd = AgentRecord("a-2", True, "t", "t", None, None, None, None, None, labels={"__name__": "x", "bad-key": "v"})
    assert info_labels(odd) == {"agent_id": "a-2", "hostname": "", "platform": "", "agent_version": ""}


KEY = "Bearer s3cret-token-for-prometheus"


def test_the_token_guards_metrics_when_set(tmp_path: Path, store: SqliteStore) -> None:
    """With dashboard.metrics_token set, a scrape without it, or with another, gets 401."""
    hello(store, "a-1", True, time.time())
    client = create_app(config(tmp_path, metrics_token=KEY.split()[1]), store).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": KEY.replace("Bearer", "Basic")}).status_code == 401
    resp = client.get("/metrics", headers={"Authorization": KEY})
    assert resp.status_code == 200 and b"fleet_agent_online" in resp.data


@pytest.mark.parametrize(("host", "enabled", "served"), [
    ("127.0.0.1", None, True), ("::1", None, True), ("localhost", None, True), ("0.0.0.0", None, False),
    ("0.0.0.0", True, True), ("127.0.0.1", False, False)])
def test_metrics_are_on_by_default_on_loopback_only(tmp_path: Path, store: SqliteStore, host: str,
                                                    enabled: bool | None, served: bool) -> None:
    """Null dashboard.metrics_enabled serves /metrics only to this host; true or false decide."""
    client = create_app(config(tmp_path, host=host, metrics_enabled=enabled), store).test_client()
    assert client.get("/metrics").status_code == (200 if served else 404)


def test_a_scrape_serves_the_snapshot_without_reading_the_store(tmp_path: Path, store: SqliteStore) -> None:
    """After a refresh, scrapes are served with the store closed, gzipped when asked, and show what
    the refresh read; the next refresh shows the new answer."""
    now = time.time()
    hello(store, "a-1", True, now)
    answer(store, "a-1", "cpu", {"percent": 10.0}, now - 5, 0)
    cfg = config(tmp_path)
    app = create_app(cfg, store)
    exposition: Exposition = app.extensions["fleet_metrics"]
    exposition.refresh()
    answer(store, "a-1", "cpu", {"percent": 20.0}, now - 1, 1)
    store.close()  # any read now raises
    client = app.test_client()
    resp = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip" and resp.headers["Content-Type"].startswith("text/plain")
    assert parse(gzip.decompress(resp.data).decode())[("fleet_cpu_percent", frozenset({("agent_id", "a-1")}))] == 10
    exposition.reads.store = SqliteStore(str(tmp_path / "fleet.db"))
    exposition.clock = lambda: now + 20  # cpu is read again after dashboard.metrics_refresh_s
    exposition.refresh()
    assert scrape_client(client)[("fleet_cpu_percent", frozenset({("agent_id", "a-1")}))] == 20


def test_a_page_the_dashboard_could_not_refresh_for_four_intervals_is_not_served(tmp_path: Path,
                                                                                 store: SqliteStore) -> None:
    """When the store cannot be read, the last page is served until it is four refresh intervals
    old, then 503, so that Prometheus marks the target down; an old page after a refresh that
    worked (a slow one) is served."""
    now = time.time()
    hello(store, "a-1", True, now)
    app = create_app(config(tmp_path), store)
    exposition: Exposition = app.extensions["fleet_metrics"]
    exposition.clock = lambda: now
    assert exposition.try_refresh()
    client = app.test_client()
    exposition.clock = lambda: now + 4 * 15 + 1
    assert client.get("/metrics").status_code == 200
    store.close()
    exposition.clock = lambda: now + 4 * 15
    assert not exposition.try_refresh()
    assert client.get("/metrics").status_code == 200
    exposition.clock = lambda: now + 4 * 15 + 1
    resp = client.get("/metrics")
    assert resp.status_code == 503 and b"has not read the store for 61 s" in resp.data


def test_the_first_scrape_says_so_when_the_store_cannot_be_read(tmp_path: Path, store: SqliteStore) -> None:
    app = create_app(config(tmp_path), store)
    store.close()
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 503 and resp.data.startswith(b"the dashboard cannot read the store: ")


def scrape_client(client: Any) -> Samples:
    return parse(client.get("/metrics").get_data(as_text=True))


def test_every_documented_name_is_exposed() -> None:
    """The names docs/prometheus.md promises (design.md's contract) are the families rendered."""
    assert exposed_names() == {
        "fleet_agent_online", "fleet_agent_info", "fleet_cpu_percent", "fleet_load1", "fleet_load5", "fleet_load15",
        "fleet_memory_used_percent", "fleet_memory_available_bytes", "fleet_swap_used_percent",
        "fleet_disk_used_percent", "fleet_disk_free_bytes", "fleet_network_receive_bytes_total",
        "fleet_network_transmit_bytes_total", "fleet_answer_age_seconds", "fleet_requests_answered_ratio",
        "fleet_process_count"}


def test_a_refresh_interval_below_a_second_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dashboard\.metrics_refresh_s"):
        load_config(None, env={"FLEET_DASHBOARD_METRICS_REFRESH_S": "0.5"})


ANSWERS = st.fixed_dictionaries({t: conforming(DATATYPES[t].data) for t in VALUE_TYPES})


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=ANSWERS, ages=st.fixed_dictionaries({t: st.sampled_from([5, 170, 190, 890, 910]) for t in VALUE_TYPES}))
def test_any_conforming_answers_are_exposed_as_stored(tmp_path: Path, data: dict[str, Any],
                                                      ages: dict[str, int]) -> None:
    """Whatever conforming data the agents send (nulls, odd mount points and interface names, extra
    fields), the exposition parses back to the newest stored values, current ones only."""
    db = tmp_path / f"{time.monotonic_ns()}.db"
    store = SqliteStore(str(db))
    try:
        now = time.time()
        hello(store, "h-1", True, now)
        for type_, value in data.items():
            answer(store, "h-1", type_, value, now - ages[type_])
        cfg = load_config(None, env={"FLEET_PERSISTER_SQLITE_PATH": str(db)})
        got = of(scrape(cfg, store), "h-1")
        want = expected(store, "h-1", time.time(), cfg.controller.schedule)
        asked = min(ages.values()) < cfg.dashboard.stats_window_s  # no ratio for an agent asked nothing lately
        ratio = {("fleet_requests_answered_ratio", frozenset()): 1.0} if asked else {}
        assert without_ages(got) == without_ages(want) | {("fleet_agent_online", frozenset()): 1.0} | ratio
    finally:
        store.close()
