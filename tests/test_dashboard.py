"""The dashboard over a real SQLite store, through Flask's test client: what each page shows,
sorting and filtering, the series behind the charts, and who may press "ask now"."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from conftest import BIN, start_sim, wait_for
from helpers import examples, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conforming
from werkzeug.datastructures import MultiDict

from fleet_common import Request, Response, Status, iso
from fleet_common.cli import run_main
from fleet_common.config import Config, ConfigError, load_config
from fleet_common.datatypes import BUILTIN as DATATYPES
from fleet_common.jobs import AgentResult, Candidate, JobResult, JobSpec, Tally, select
from fleet_dashboard.app import create_app
from fleet_dashboard.data import FleetQuery, network_series
from fleet_dashboard.labellinks import LabelLinks
from fleet_persister.datacheck import check_data
from fleet_store import Batch, Incoming, RejectedRecord, RequestRecord
from fleet_store.sqlite import SqliteStore
from fleetctl import cli
from fleetctl.broker import free_port

NOW = time.time()


def answer(store: SqliteStore, agent: str, type_: str, data: dict[str, Any], at: float, n: int) -> None:
    rid = f"{agent}-{type_}-{n}"
    store.write(Batch(requests=[Incoming(Request(id=rid, type=type_, issued_at=iso(at), expires_at=iso(at + 60)),
                                         agent, iso(at))],
                      responses=[Incoming(Response(id=rid, agent_id=agent, type=type_, status="ok", data=data,
                                                   collected_at=iso(at + 0.02 * (n + 1))), agent, iso(at + 0.05))]))


LABELS = {"web-01": {"role": "web", "dc": "ams"}, "web-02": {"role": "web", "dc": "fra"},
          "db-01": {"role": "db", "dc": "ams"}}


def hello(store: SqliteStore, agent: str, online: bool, at: float) -> None:
    extra: dict[str, Any] = {"hostname": f"{agent}.example", "platform": "Linux-6.1-x86_64", "agent_version": "0.1.0",
                             "types": ["cpu", "disk", "memory", "network", "os_info", "ping", "processes"],
                             "labels": LABELS.get(agent, {})}
    store.write(Batch(statuses=[Incoming(Status(agent_id=agent, online=online, ts=iso(at), **extra), agent,
                                         iso(at))]))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    # "now" per test: readings count as current only for a few intervals, and a long suite
    # would otherwise age a clock read at import past that
    global NOW
    NOW = time.time()
    s = SqliteStore(str(tmp_path / "fleet.db"))
    for i, (agent, cpu) in enumerate((("web-01", 12.5), ("web-02", 87.0), ("db-01", 55.0))):
        hello(s, agent, True, NOW - 30)
        for n in range(3):
            at = NOW - 300 + 60 * n
            answer(s, agent, "cpu", {"percent": cpu + n}, at, n)
            answer(s, agent, "memory", {"virtual": {"percent": 40.0 + i}, "swap": {"percent": 0}}, at, n)
            answer(s, agent, "network", {"interfaces": [
                {"name": "lo", "bytes_recv": 10 ** 9 * n, "bytes_sent": 10 ** 9 * n},
                {"name": "eth0", "bytes_recv": 6000 * n, "bytes_sent": 1200 * n}]}, at, n)
        answer(s, agent, "disk", {"partitions": [
            {"device": "/dev/sda1", "mountpoint": "/", "fstype": "ext4", "percent": 30.0 + i},
            {"device": "/dev/sdb1", "mountpoint": "/var", "fstype": "ext4", "percent": 70.0 + 10 * i}]}, NOW - 100, 0)
    answer(s, "web-01", "os_info", {"hostname": "web-01", "os": "Linux", "release": "6.1.0", "version": "#1 SMP",
                                    "arch": "x86_64", "cpu_count": 4, "users": [{"name": "ops"}]}, NOW - 50, 0)
    answer(s, "web-01", "processes", {"processes": [
        {"pid": 1, "ppid": 0, "name": "systemd", "username": "root", "status": "sleeping", "cpu_percent": 0.1,
         "rss": 12 * 2 ** 20},
        {"pid": 4242, "ppid": 1, "name": "<b>nginx</b>", "username": "www-data", "status": "running",
         "cpu_percent": 7.5, "rss": 80 * 2 ** 20}]}, NOW - 40, 0)
    hello(s, "gone-01", False, NOW - 3600)
    hello(s, "quiet-01", True, NOW - 3600)
    s.write(Batch(rejected=[RejectedRecord(id="x1", received_at=iso(NOW - 5), topic="fleet/web-01/res/cpu",
                                           reason="bad_json", payload="<script>alert(1)</script>")]))
    yield s
    s.close()


def config(tmp_path: Path, **dashboard: Any) -> Config:
    return load_config(None, env={"FLEET_PERSISTER_SQLITE_PATH": str(tmp_path / "fleet.db")}).replace(
        "dashboard", **dashboard)


class FakeAsker:
    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def __call__(self, cfg: Config, agent_id: str, type_: str, timeout_s: float) -> Response:
        self.asked.append((agent_id, type_, cfg.mqtt.username))
        return Response(id="fresh-1", agent_id=agent_id, type=type_, status="ok", data={"percent": 1.0},
                        collected_at=iso(time.time()))


class FakeRunner:
    """A job that answers as told, once `release` is set: `outcome` maps agent ids to ok, error or
    no_answer (online agents not named answer ok; offline ones are queued)."""

    def __init__(self, outcome: dict[str, str] | None = None, release: bool = True) -> None:
        self.outcome = outcome or {}
        self.release = threading.Event()
        if release:
            self.release.set()
        self.runs: list[tuple[Config, JobSpec, str]] = []

    def __call__(self, cfg: Config, spec: JobSpec, known: list[Candidate], on_tally: Callable[[Tally], None],
                 job_id: str) -> JobResult:
        self.runs.append((cfg, spec, job_id))
        targets = select(known, spec)
        results = [AgentResult(t.agent_id, self.outcome.get(t.agent_id, "ok") if t.online else "queued",
                               f"{job_id}-{t.agent_id}") for t in targets]
        for r in results:
            if r.status == "error":
                r.error = {"code": "unknown_type", "message": "<no such type>"}
            elif r.status == "ok":
                r.data, r.latency_ms = {"percent": 5.0}, 12.0
        online = sum(1 for t in targets if t.online)
        on_tally(Tally(targeted=online, waiting=online, queued=len(targets) - online))
        assert self.release.wait(10)
        return JobResult(job_id, spec.type, results)


def client(tmp_path: Path, store: SqliteStore, asker: FakeAsker | None = None, runner: FakeRunner | None = None,
           **dashboard: Any) -> Any:
    return create_app(config(tmp_path, **dashboard), store, asker or FakeAsker(), runner or FakeRunner()).test_client()


def agent_order(html: str) -> list[str]:
    return re.findall(r'<tr class="agent-row" data-agent="([^"]+)"', html)


def test_fleet_page_lists_agents_with_state_counts_and_readings(tmp_path, store) -> None:
    """The fleet page lists every agent with its state, answered ratio, latency and its current CPU,
    memory and fullest disk, and counts online, silent and offline agents."""
    html = client(tmp_path, store).get("/").get_data(as_text=True)
    assert sorted(agent_order(html)) == ["db-01", "gone-01", "quiet-01", "web-01", "web-02"]
    assert re.search(r'id="count-online">3<', html) and re.search(r'id="count-silent">1<', html)
    assert re.search(r'id="count-offline">1<', html)
    row = re.search(r'data-agent="web-02">(.*?)</tr>', html, re.S).group(1)
    assert "89%" in row and "41%" in row and "80%" in row and "/var" in row and "10/10" in row
    assert 'class="pill silent"' in re.search(r'data-agent="quiet-01">(.*?)</tr>', html, re.S).group(1)


def test_fleet_sorts_filters_and_pages_on_the_server(tmp_path, store) -> None:
    """Sort by CPU (agents without a reading last), filter by text and by state, and page; the
    partial form is the table alone, for the page's live refresh."""
    c = client(tmp_path, store)
    assert agent_order(c.get("/?sort=cpu&dir=desc").get_data(as_text=True))[:3] == ["web-02", "db-01", "web-01"]
    assert agent_order(c.get("/?sort=cpu&dir=asc").get_data(as_text=True))[:3] == ["web-01", "db-01", "web-02"]
    assert agent_order(c.get("/?q=WEB").get_data(as_text=True)) == ["web-01", "web-02"]
    assert agent_order(c.get("/?state=offline").get_data(as_text=True)) == ["gone-01"]
    paged = c.get("/api/fleet?per=10&state=online&sort=agent_id&page=2").get_json()
    assert paged["counts"] == {"online": 3, "silent": 1, "offline": 1} and paged["matched"] == 3
    assert paged["page"] == 1 and [a["agent_id"] for a in paged["agents"]] == ["db-01", "web-01", "web-02"]
    part = c.get("/?partial=1&sort=agent_id").get_data(as_text=True)
    assert "<html" not in part and agent_order(part)[0] == "db-01"


def test_fleet_shows_labels_and_filters_by_them(tmp_path, store) -> None:
    """Each row shows its agent's labels, each a link to the filter by it; `?label=k=v` (repeatable)
    keeps the agents whose labels include every pair, in the page, its partial form and /api/fleet."""
    c = client(tmp_path, store)
    html = c.get("/").get_data(as_text=True)
    row = re.search(r'data-agent="web-01">(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'<a class="label" data-labels href="([^"]+)"[^>]*>([^<]+)</a>', row) == [
        ("/?sort=agent_id&amp;dir=asc&amp;label=dc%3Dams", "dc=ams"),
        ("/?sort=agent_id&amp;dir=asc&amp;label=role%3Dweb", "role=web")]
    assert 'class="labels"></td>' in re.search(r'data-agent="gone-01">(.*?)</tr>', html, re.S).group(1)

    assert agent_order(c.get("/?label=role=web").get_data(as_text=True)) == ["web-01", "web-02"]
    assert agent_order(c.get("/?label=dc=ams&label=role=web").get_data(as_text=True)) == ["web-01"]
    assert agent_order(c.get("/?label=role=build").get_data(as_text=True)) == []
    assert "no agent matches this filter" in c.get("/?label=role=build").get_data(as_text=True)
    part = c.get("/?partial=1&label=dc=ams&sort=cpu&dir=desc&q=01").get_data(as_text=True)
    assert agent_order(part) == ["db-01", "web-01"]
    # the filter is shown, each pair a link that drops it; a row's label link replaces its key's value
    bar = re.search(r'id="label-filter"(.*?)</div>', part, re.S).group(1)
    rest = "/?q=01&amp;sort=cpu&amp;dir=desc"
    assert re.findall(r'href="([^"]+)"[^>]*>([^<]+)</a>', bar) == [(rest, "dc=ams \u00d7"), (rest, "all agents")]
    db_row = re.search(r'data-agent="db-01">(.*?)</tr>', part, re.S).group(1)
    assert '<a class="label on" data-labels href="/?q=01&amp;sort=cpu&amp;dir=desc&amp;label=dc%3Dams"' in db_row
    assert 'href="/?q=01&amp;sort=cpu&amp;dir=desc&amp;label=dc%3Dams&amp;label=role%3Ddb"' in db_row
    # sorting and paging keep the filter
    assert 'label=dc%3Dams&amp;sort=agent_id' in part

    api = c.get("/api/fleet?label=role=web&sort=cpu&dir=desc").get_json()
    assert api["matched"] == 2 and [(a["agent_id"], a["labels"]) for a in api["agents"]] == [
        ("web-02", {"role": "web", "dc": "fra"}), ("web-01", {"role": "web", "dc": "ams"})]


def test_agent_page_shows_os_processes_recent_requests_and_escapes(tmp_path, store) -> None:
    """The agent page shows OS info, the latest process list and recent requests with state and
    latency; text from hosts is escaped."""
    html = client(tmp_path, store).get("/agent/web-01").get_data(as_text=True)
    assert "Linux 6.1.0" in html and "4 CPUs" in html and "ops" in html
    assert "&lt;b&gt;nginx&lt;/b&gt;" in html and "<b>nginx</b>" not in html and "80.0 MiB" in html
    recent = re.search(r'id="recent-requests">(.*?)</table>', html, re.S).group(1)
    assert recent.count('class="pill ok"') >= 10 and " ms" in recent
    assert 'id="chart-cpu"' in html and "uPlot.iife.min.js" in html
    assert client(tmp_path, store).get("/agent/nobody").status_code == 404


def test_series_feed_the_charts(tmp_path, store) -> None:
    """The series endpoint gives time-ordered CPU and memory percentages, disk use per mount point
    (fullest first) and network throughput from counter deltas, loopback excluded."""
    doc = client(tmp_path, store).get("/api/agent/web-02/series?range=1h").get_json()
    assert doc["cpu"]["lines"]["cpu %"] == [87.0, 88.0, 89.0] and doc["cpu"]["t"] == sorted(doc["cpu"]["t"])
    assert doc["memory"]["lines"]["memory %"] == [41.0, 41.0, 41.0]
    assert list(doc["disk"]["lines"]) == ["/var", "/"] and doc["disk"]["lines"]["/var"] == [80.0]
    rates = doc["network"]["lines"]
    assert len(doc["network"]["t"]) == 2 and rates["received B/s"][0] == pytest.approx(100, rel=0.01)
    assert rates["sent B/s"][0] == pytest.approx(20, rel=0.01)
    assert client(tmp_path, store).get("/api/agent/web-02/series?range=15m").get_json()["disk"]["t"]


def test_network_counter_reset_leaves_a_gap() -> None:
    """A counter that goes backwards (a reboot) gives no rate for that step rather than a negative one."""
    def rec(at: float, recv: int) -> RequestRecord:
        return RequestRecord(id=str(at), agent_id="a", type="network", params=None, issued_at=iso(at), expires_at=None,
                             state="ok", answered_at=iso(at), latency_ms=1.0, error=None, expire_at=None,
                             data={"interfaces": [{"name": "eth0", "bytes_recv": recv, "bytes_sent": 0}]})
    s = network_series([rec(NOW, 1000), rec(NOW + 10, 2000), rec(NOW + 20, 500)])
    assert s.lines["received B/s"] == [pytest.approx(100.0), None]


def test_rejected_page_lists_dead_letters_escaped(tmp_path, store) -> None:
    """The rejected page shows each dead letter's reason, topic and payload, escaped."""
    html = client(tmp_path, store).get("/rejected").get_data(as_text=True)
    assert "bad_json" in html and "fleet/web-01/res/cpu" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html


def test_read_only_by_default(tmp_path, store) -> None:
    """With ask_enabled false there is no ask button, no sign-in, and asking is refused."""
    asker = FakeAsker()
    c = client(tmp_path, store, asker)
    assert 'id="ask"' not in c.get("/agent/web-01").get_data(as_text=True)
    assert c.get("/signin").status_code == 404
    assert c.post("/api/agent/web-01/ask", json={"type": "cpu"}).status_code == 403
    assert asker.asked == []


def test_only_signed_in_operators_may_ask(tmp_path, store) -> None:
    """With asking enabled, the button shows only after signing in with the operator token; an ask
    needs the session's CSRF token (or the bearer token) and goes out as the operator MQTT user."""
    asker = FakeAsker()
    c = client(tmp_path, store, asker, ask_enabled=True, operator_token="s3cret-token", mqtt_username="ops-1")
    assert 'id="ask"' not in c.get("/agent/web-01").get_data(as_text=True)
    assert c.post("/api/agent/web-01/ask", json={"type": "cpu"}).status_code == 403
    assert c.post("/signin", data={"token": "wrong"}).status_code == 401
    signed = c.post("/signin?next=/agent/web-01", data={"token": "s3cret-token"})
    assert signed.status_code == 302 and signed.headers["Location"].endswith("/agent/web-01")
    assert "SameSite=Strict" in signed.headers["Set-Cookie"] and "HttpOnly" in signed.headers["Set-Cookie"]
    html = c.get("/agent/web-01").get_data(as_text=True)
    assert 'id="ask-button"' in html
    csrf = re.search(r'data-csrf="([^"]+)"', html).group(1)
    assert c.post("/api/agent/web-01/ask", json={"type": "cpu"}).status_code == 403  # no CSRF token
    done = c.post("/api/agent/web-01/ask", json={"type": "cpu"}, headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.get_json()["answer"]["id"] == "fresh-1"
    bearer = client(tmp_path, store, asker, ask_enabled=True, operator_token="s3cret-token").post(
        "/api/agent/web-02/ask", json={"type": "memory"}, headers={"Authorization": "Bearer s3cret-token"})
    assert bearer.status_code == 200
    assert asker.asked == [("web-01", "cpu", "ops-1"), ("web-02", "memory", None)]


def test_ask_enabled_needs_an_operator_token(tmp_path) -> None:
    """Turning asking on without an operator token stops start-up, naming the key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"FLEET_DASHBOARD_ASK_ENABLED": "true"})
    assert "dashboard.operator_token" in str(info.value)
    cfg = load_config(None, env={"FLEET_DASHBOARD_ASK_ENABLED": "true", "FLEET_DASHBOARD_OPERATOR_TOKEN": "0123"})
    assert cfg.dashboard.operator_token == "0123"


def test_fleetctl_dashboard_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys) -> None:
    """`fleetctl dashboard` where fleet-dashboard is not installed ends with one plain line saying how."""
    monkeypatch.setitem(sys.modules, "fleet_dashboard.cli", None)  # what an absent package looks like
    monkeypatch.chdir(tmp_path)
    assert run_main("fleetctl", cli.main, ["dashboard"]) == 2
    assert "pip install ./dashboard" in capsys.readouterr().err


def test_fleetctl_dashboard_with_no_entry_point_says_how_to_install(tmp_path, monkeypatch, capsys) -> None:
    """`fleetctl dashboard` where no distribution declares the command ends with one plain line saying how."""
    monkeypatch.setattr(cli.metadata, "entry_points", lambda **_: [])
    monkeypatch.chdir(tmp_path)
    assert run_main("fleetctl", cli.main, ["dashboard"]) == 2
    err = capsys.readouterr().err
    assert "pip install ./dashboard" in err and err.count("\n") == 1


def test_fleetctl_finds_the_dashboard_through_its_entry_point() -> None:
    """The dashboard declares `fleetctl dashboard` as a fleetctl.commands entry point, and fleetctl finds it there."""
    from fleet_dashboard.cli import fleetctl_command

    assert cli.installed_command("dashboard") is fleetctl_command


def test_fleetctl_and_the_dashboard_load_neither_each_other_nor_the_persister() -> None:
    """fleetctl loads no dashboard code, and neither loads the persister's: both read through fleet_store."""
    code = ("import sys, fleetctl.cli, fleetctl.views\n"
            "loaded = lambda *names: sorted(m for m in sys.modules if m.split('.')[0] in names)\n"
            "assert not loaded('fleet_dashboard', 'fleet_persister'), loaded('fleet_dashboard', 'fleet_persister')\n"
            "import fleet_dashboard.app, fleet_dashboard.cli\n"
            "assert not loaded('fleet_persister'), loaded('fleet_persister')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_fleet_dashboard_serves_and_its_check_follows_it(tmp_path, store, procs) -> None:
    """fleet-dashboard serves the fleet page over HTTP, and --check exits 0 while it runs, 1 otherwise."""
    port = free_port()
    env = {"FLEET_PERSISTER_SQLITE_PATH": str(tmp_path / "fleet.db"), "FLEET_DASHBOARD_PORT": str(port)}

    def check() -> int:
        return subprocess.run([str(BIN / "fleet-dashboard"), "--check"], env={**env, "PATH": ""},
                              capture_output=True, timeout=30).returncode

    assert check() == 1
    procs.start("dashboard", "fleetctl", "dashboard", "--port", str(port), env=env)
    wait_for(lambda: check() == 0, 20, what="the dashboard to answer /healthz")
    html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
    assert "web-01" in html and "gone-01" in html
    assert procs.stop("dashboard") == 0
    assert check() == 1


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_any_data_the_contract_accepts_renders(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """The dashboard relies on the per-type contract: whatever data of cpu, memory, disk and network
    fleet_common.datatypes accepts (generated, nulls and extra fields included), the fleet page, the
    agent page and the series behind its charts answer 200."""
    folder = tmp_path_factory.mktemp("contract")
    s = SqliteStore(str(folder / "fleet.db"))
    try:
        hello(s, "web-01", True, NOW - 30)
        for n in range(3):
            for type_ in ("cpu", "memory", "disk", "network"):
                value = data.draw(conforming(DATATYPES[type_].data))
                check_data(type_, value, 0)
                answer(s, "web-01", type_, value, time.time() - 300 + 60 * n, n)
        web = client(folder, s)
        for path in ("/", "/api/fleet", "/agent/web-01", "/api/agent/web-01/series?range=1h"):
            page = web.get(path)
            assert page.status_code == 200, (path, page.data[:300])
    finally:
        s.close()


@pytest.mark.parametrize(("path", "name", "allowed"), [
    ("/api/agent/web-01/series?range=bogus", "range", ["15m", "1h", "6h", "24h", "7d", "30d", "90d", "400d"]),
    ("/api/agent/web-01/series?rnage=6h", "rnage", ["range"]),
    ("/api/fleet?sort=colour", "sort", ["agent_id", "state", "last_seen", "answered", "latency", "cpu", "memory",
                                        "disk"]),
    ("/api/fleet?dir=up", "dir", ["asc", "desc"]),
    ("/api/fleet?state=asleep", "state", ["", "online", "silent", "offline"]),
    ("/api/fleet?page=0", "page", None),
    ("/api/fleet?page=two", "page", None),
    ("/api/fleet?per=5", "per", None),
    ("/api/fleet?per=1001", "per", None),
    ("/api/fleet?q=" + "x" * 101, "q", None),
    ("/api/fleet?partial=1", "partial", ["dir", "label", "page", "per", "q", "sort", "state"]),
    ("/api/fleet?label=role", "label", None),
    ("/api/fleet?label=role=web&label=role=db", "label", None),
])
def test_api_refuses_bad_query_values_naming_the_parameter(tmp_path, store, path, name, allowed) -> None:
    """Every /api query parameter is checked: a bad value or an unknown parameter gets 400 with a
    JSON reason naming the parameter and what it may be, never a silent default."""
    got = client(tmp_path, store).get(path)
    assert got.status_code == 400 and got.is_json, (path, got.data[:200])
    doc = got.get_json()
    assert doc["parameter"] == name and doc["allowed"] == allowed and f"'{name}'" in doc["error"]


@pytest.mark.parametrize(("path", "says"), [
    ("/agent/web-01?range=1y", "'range': '1y' is not one of 15m, 1h, 6h, 24h, 7d, 30d, 90d, 400d"),
    ("/agent/web-01?partial=yes", "'partial': 'yes' is not one of 0, 1"),
    ("/?sort=colour", "'sort': 'colour' is not one of agent_id, state"),
    ("/?per=abc", "'per': 'abc' is not a whole number; it must be one from 10 to 1000"),
    ("/?page=-1", "'page': -1 is out of range; it must be a whole number of at least 1"),
    ("/?dir=sideways", "'dir': 'sideways' is not one of asc, desc"),
    ("/?state=gone", "'state': 'gone' is not one of '', online, silent, offline"),
    ("/?label=Role=web", "'label': label key 'Role' must match [a-z][a-z0-9_]{0,31}"),
    ("/?label=role=%3Cscript%3E", "'label': label role: value '<script>' must be 1-64 characters of [A-Za-z0-9_.-]"),
    ("/?label=role=web,dc=ams", "'label': 'role=web,dc=ams' must be one key=value pair"),
    ("/?label=", "'label': '' must be one key=value pair"),
    ("/rejected?limit=5", "'limit': is not a parameter of this page; this page takes partial"),
    ("/healthz?verbose=1", "'verbose': is not a parameter of this page; this page takes none"),
])
def test_pages_refuse_bad_query_values_in_plain_text(tmp_path, store, path, says) -> None:
    """Pages check their query parameters too, and say what is wrong in one plain line."""
    got = client(tmp_path, store).get(path)
    assert got.status_code == 400 and got.mimetype == "text/plain", (path, got.data[:200])
    assert says in got.get_data(as_text=True)


def test_good_query_values_and_what_the_pages_send_are_accepted(tmp_path, store) -> None:
    """What the pages' own links, form and script send (an empty state and filter among them) is accepted."""
    c = client(tmp_path, store)
    for path in ("/?q=&state=&sort=agent_id&dir=asc", "/?partial=1&state=online&page=3&per=1000",
                 "/api/fleet?q=web&state=&sort=disk&dir=desc&page=1&per=10", "/agent/web-01?range=7d&partial=1",
                 "/api/agent/web-01/series?range=15m", "/rejected?partial=1", "/static/dashboard.js?v=1"):
        assert c.get(path).status_code == 200, path


def test_sign_in_refuses_a_next_that_leaves_the_site(tmp_path, store) -> None:
    """The sign-in page's `next` must be a path on this site: another site (also written `/\\host`) is refused."""
    c = client(tmp_path, store, ask_enabled=True, operator_token="s3cret-token")
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example/"):
        got = c.post("/signin", query_string={"next": target}, data={"token": "s3cret-token"})
        assert got.status_code == 400 and "'next'" in got.get_data(as_text=True), target
    assert c.post("/signin?next=/rejected", data={"token": "s3cret-token"}).headers["Location"].endswith("/rejected")


def signed_in(tmp_path: Path, store: SqliteStore, asker: FakeAsker | None = None, runner: FakeRunner | None = None,
              **dashboard: Any) -> tuple[Any, str]:
    """A test client signed in as an operator, and the CSRF token its pages carry."""
    c = client(tmp_path, store, asker, runner, ask_enabled=True, operator_token="s3cret-token", **dashboard)
    assert c.post("/signin", data={"token": "s3cret-token"}).status_code == 302
    return c, re.search(r'data-csrf="([^"]+)"', c.get("/agent/web-01").get_data(as_text=True)).group(1)


def test_sign_out_ends_the_session_on_the_server(tmp_path, store) -> None:
    """A copy of the session cookie taken before signing out signs nobody in after it: the page shows
    no ask button and an ask with the old cookie and its CSRF token is refused."""
    asker = FakeAsker()
    c, csrf = signed_in(tmp_path, store, asker)
    old = c.get_cookie("session").value
    assert c.post("/signout").status_code == 302 and c.get_cookie("session") is None
    thief = c.application.test_client()
    thief.set_cookie("session", old)
    assert 'id="ask-button"' not in thief.get("/agent/web-01").get_data(as_text=True)
    assert "operator sign-in" in thief.get("/").get_data(as_text=True)
    refused = thief.post("/api/agent/web-01/ask", json={"type": "cpu"}, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403 and asker.asked == []


def test_signing_in_again_retires_the_previous_session(tmp_path, store) -> None:
    """Each sign-in gets a new session id: a cookie from before it (one planted on the browser, say) stops working."""
    c, _ = signed_in(tmp_path, store)
    before = c.get_cookie("session").value
    assert c.post("/signin", data={"token": "s3cret-token"}).status_code == 302
    assert 'id="ask-button"' in c.get("/agent/web-01").get_data(as_text=True)
    stale = c.application.test_client()
    stale.set_cookie("session", before)
    assert 'id="ask-button"' not in stale.get("/agent/web-01").get_data(as_text=True)


def test_no_page_may_be_framed(tmp_path, store) -> None:
    """Every response, pages, API, errors and static files alike, forbids framing (X-Frame-Options and
    CSP frame-ancestors) alongside the rest of the CSP."""
    c = client(tmp_path, store, ask_enabled=True, operator_token="s3cret-token")
    for path in ("/", "/agent/web-01", "/api/fleet", "/api/agent/web-01/series", "/signin", "/healthz",
                 "/static/dashboard.js", "/agent/nobody", "/api/fleet?sort=colour"):
        got = c.get(path)
        csp = got.headers["Content-Security-Policy"]
        assert got.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
    assert c.post("/signin", data={"token": "wrong"}).headers["X-Frame-Options"] == "DENY"


def sign_in_cookie(c: Any, **kw: Any) -> str:
    got = c.post("/signin", data={"token": "s3cret-token"}, **kw)
    assert got.status_code == 302
    return got.headers["Set-Cookie"]


@pytest.mark.parametrize(("secure_cookies", "how", "secure"), [
    (False, {}, False),
    (False, {"base_url": "https://dash.example"}, True),
    (False, {"headers": {"X-Forwarded-Proto": "https"}}, True),
    (False, {"headers": {"X-Forwarded-Proto": "http"}}, False),
    (True, {}, True),
])
def test_the_sign_in_cookie_is_secure_over_tls_or_when_configured(tmp_path, store, secure_cookies, how,
                                                                   secure) -> None:
    """The session cookie is always HttpOnly and SameSite=Strict, and Secure when the request came over
    HTTPS (directly or as a TLS proxy's X-Forwarded-Proto says) or dashboard.secure_cookies is true."""
    c = client(tmp_path, store, ask_enabled=True, operator_token="s3cret-token", secure_cookies=secure_cookies)
    cookie = sign_in_cookie(c, **how)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert ("; Secure" in cookie) is secure, cookie
    assert ("; Secure" in c.post("/signout", **how).headers["Set-Cookie"]) is secure  # the clearing one matches


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttled(tmp_path: Path, store: SqliteStore, asker: FakeAsker | None = None) -> tuple[Any, FakeClock]:
    """A dashboard with asking on whose wrong-token counter reads a fake clock."""
    app = create_app(config(tmp_path, ask_enabled=True, operator_token="s3cret-token"), store, asker or FakeAsker())
    clock = FakeClock()
    app.extensions["fleet_operators"].wrong_tokens.clock = clock
    return app, clock


def from_address(address: str) -> dict[str, Any]:
    return {"environ_base": {"REMOTE_ADDR": address}}


def test_wrong_tokens_lock_the_address_out_for_a_while(tmp_path, store, caplog) -> None:
    """Five wrong tokens within a minute from one address: every token from it, the right one too,
    gets 429 with Retry-After for five minutes, with one log line; other addresses still sign in."""
    app, clock = throttled(tmp_path, store)
    c = app.test_client()
    guesser = from_address("192.0.2.7")
    for n in range(5):
        clock.now += 5
        assert c.post("/signin", data={"token": f"guess-{n}"}, **guesser).status_code == 401
    locked = c.post("/signin", data={"token": "s3cret-token"}, **guesser)
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "300"
    assert "too many wrong operator tokens from 192.0.2.7: try again in 300 s" in locked.get_data(as_text=True)
    assert locked.headers["X-Frame-Options"] == "DENY"
    assert app.test_client().post("/signin", data={"token": "s3cret-token"},
                                  **from_address("198.51.100.1")).status_code == 302
    lockouts = [r.getMessage() for r in caplog.records if "wrong operator tokens" in r.getMessage()]
    assert lockouts == ["5 wrong operator tokens from 192.0.2.7 within 60 s: refusing its tokens for 300 s"]
    clock.now += 200
    assert c.post("/signin", data={"token": "s3cret-token"}, **guesser).headers["Retry-After"] == "100"
    clock.now += 101
    assert c.post("/signin", data={"token": "s3cret-token"}, **guesser).status_code == 302


def test_wrong_tokens_spread_wider_than_the_window_do_not_lock_out(tmp_path, store) -> None:
    """Only wrong tokens within the window count: four, a pause of a minute, four more, and the right one works."""
    app, clock = throttled(tmp_path, store)
    c = app.test_client()
    for n in range(8):
        clock.now += 61 if n == 4 else 1
        assert c.post("/signin", data={"token": "nope"}).status_code == 401
    assert c.post("/signin", data={"token": "s3cret-token"}).status_code == 302


def test_wrong_bearer_tokens_count_and_get_a_json_429(tmp_path, store) -> None:
    """Wrong bearer tokens count as wrong tokens too, once per request; once locked out an API call with
    a bearer token gets 429, JSON and Retry-After, and asks nothing, while other addresses still may."""
    asker = FakeAsker()
    app, _ = throttled(tmp_path, store, asker)
    c = app.test_client()
    for n in range(5):
        got = c.post("/api/agent/web-01/ask", json={"type": "cpu"}, headers={"Authorization": f"Bearer bad-{n}"})
        assert got.status_code == 403, n
    locked = c.post("/api/agent/web-01/ask", json={"type": "cpu"}, headers={"Authorization": "Bearer s3cret-token"})
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "300"
    assert locked.get_json() == {"error": "too many wrong operator tokens from 127.0.0.1: try again in 300 s",
                                 "retry_after_s": 300}
    assert c.get("/").status_code == 200  # without a token the pages are still there
    other = c.post("/api/agent/web-01/ask", json={"type": "cpu"}, headers={"Authorization": "Bearer s3cret-token"},
                   **from_address("198.51.100.1"))
    assert other.status_code == 200 and asker.asked == [("web-01", "cpu", None)]


def test_the_served_dashboard_checks_queries_ends_sessions_and_limits_tokens(tmp_path, store, procs) -> None:
    """The real fleet-dashboard process, over HTTP: a bad range gets a JSON 400, every response forbids
    framing, dashboard.secure_cookies (from the environment) makes the cookie Secure, a cookie replayed
    after sign-out signs nobody in, and wrong tokens end in 429 with Retry-After."""
    port = free_port()
    env = {"FLEET_PERSISTER_SQLITE_PATH": str(tmp_path / "fleet.db"), "FLEET_DASHBOARD_PORT": str(port),
           "FLEET_DASHBOARD_ASK_ENABLED": "true", "FLEET_DASHBOARD_OPERATOR_TOKEN": "s3cret-token",
           "FLEET_DASHBOARD_SECURE_COOKIES": "true"}
    procs.start("dashboard", "fleet-dashboard", env=env)

    def call(method: str, path: str, body: str | None = None, cookie: str = "") -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/x-www-form-urlencoded", **({"Cookie": cookie} if cookie else {})}
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    def answers() -> bool:
        try:
            return call("GET", "/healthz").status == 200
        except OSError:
            return False

    wait_for(answers, 20, what="the dashboard to answer /healthz")
    bad = call("GET", "/api/agent/web-01/series?range=bogus")
    assert bad.status == 400 and bad.getheader("Content-Type") == "application/json"
    assert bad.getheader("X-Frame-Options") == "DENY" and "frame-ancestors 'none'" in bad.getheader(
        "Content-Security-Policy")
    signed = call("POST", "/signin", "token=s3cret-token")
    assert signed.status == 302 and "; Secure" in signed.getheader("Set-Cookie")
    cookie = signed.getheader("Set-Cookie").split(";")[0]
    assert "sign out" in urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/", headers={"Cookie": cookie}), timeout=10).read().decode()
    assert call("POST", "/signout", cookie=cookie).status == 302
    replayed = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Cookie": cookie}),
                                      timeout=10).read().decode()
    assert "sign out" not in replayed and "operator sign-in" in replayed
    assert [call("POST", "/signin", f"token=guess-{n}").status for n in range(5)] == [401] * 5
    locked = call("POST", "/signin", "token=s3cret-token")
    assert locked.status == 429 and 295 <= int(locked.getheader("Retry-After")) <= 300
    assert procs.stop("dashboard") == 0
    assert "5 wrong operator tokens from 127.0.0.1 within 60 s" in procs.log("dashboard")


def ask_labels(c: Any, csrf: str | None, **body: Any) -> Any:
    return c.post("/api/jobs", json=body, headers={"X-CSRF-Token": csrf} if csrf else {})


def wait_job(c: Any, job: str, state: str) -> dict[str, Any]:
    return wait_for(lambda: (doc := c.get(f"/api/job/{job}").get_json())["state"] == state and doc, 10,
                    what=f"job {job} {state}")


def test_asking_a_label_selection_is_for_operators_only(tmp_path, store) -> None:
    """"Ask now" for a label selection takes the checks of asking one agent: off unless enabled, then
    only a signed-in operator with the session's CSRF token, or the bearer token; the job goes out as
    the operators' MQTT user, waits dashboard.ask_timeout_s, and the fleet page offers it only to them."""
    runner = FakeRunner()
    body = {"type": "cpu", "labels": {"role": "web"}}
    read_only = client(tmp_path, store, runner=runner)
    assert ask_labels(read_only, None, **body).status_code == 403
    assert 'id="ask-labels"' not in read_only.get("/?label=role=web").get_data(as_text=True)
    enabled = {"ask_enabled": True, "operator_token": "s3cret-token", "mqtt_username": "ops-1", "ask_timeout_s": 4}
    anonymous = client(tmp_path, store, runner=runner, **enabled)
    assert ask_labels(anonymous, None, **body).status_code == 403
    assert 'id="ask-labels"' not in anonymous.get("/?label=role=web").get_data(as_text=True)
    c, csrf = signed_in(tmp_path, store, runner=runner, mqtt_username="ops-1", ask_timeout_s=4)
    assert ask_labels(c, None, **body).status_code == 403  # no CSRF token
    assert ask_labels(c, "not-the-token", **body).status_code == 403
    assert runner.runs == []
    assert re.search(r'id="ask-labels"[^>]*>', c.get("/?label=role=web").get_data(as_text=True))
    assert re.search(r'id="ask-labels"[^>]* hidden>', c.get("/").get_data(as_text=True)), "no label filter: hidden"

    started = ask_labels(c, csrf, **body)
    assert started.status_code == 202, started.get_json()
    job = started.get_json()["job"]
    assert started.get_json()["url"] == f"/job/{job}" and started.get_json()["api"] == f"/api/job/{job}"
    bearer = anonymous.post("/api/jobs", json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert bearer.status_code == 202
    assert [(cfg.mqtt.username, spec.type, spec.selector, spec.timeout_s) for cfg, spec, _ in runner.runs] == [
        ("ops-1", "cpu", {"role": "web"}, 4.0)] * 2
    assert runner.runs[0][2] == job


@pytest.mark.parametrize(("body", "says"), [
    ({"type": "cpu", "labels": {"Role": "web"}}, "label key 'Role' must match"),
    ({"type": "cpu", "labels": {"role": "<b>web</b>"}}, "label role: value '<b>web</b>' must be 1-64 characters"),
    ({"type": "cpu", "labels": {}}, "choose at least one label"),
    ({"type": "cpu"}, "choose at least one label"),
    ({"type": "cpu", "labels": ["role=web"]}, "labels must be a mapping"),
    ({"type": "CPU!", "labels": {"role": "web"}}, "type"),
    ({"type": "cpu", "labels": {"role": "build"}}, "no known agent is one of agents labelled role=build; nothing was"),
])
def test_asking_a_label_selection_refuses_what_it_cannot_send(tmp_path, store, body, says) -> None:
    """A bad label or type, no label at all, or a selection no known agent matches: 400 saying so,
    and no job is started."""
    runner = FakeRunner()
    c, csrf = signed_in(tmp_path, store, runner=runner)
    got = ask_labels(c, csrf, **body)
    assert got.status_code == 400 and says in got.get_json()["error"], got.get_json()
    assert runner.runs == []


def stored_job_request(store: SqliteStore, job: str, agent: str, answer: str | None = None) -> None:
    """The job's request to `agent` as the persister stores it, and its answer if `answer` is given."""
    rid = f"{job}-{agent}"
    now = time.time()
    batch = Batch(requests=[Incoming(Request(id=rid, type="cpu", issued_at=iso(now), expires_at=iso(now + 3600),
                                             job=job), agent, iso(now))])
    if answer is not None:
        batch.responses.append(Incoming(Response(id=rid, agent_id=agent, type="cpu", status=answer,
                                                 data={"percent": 77.0} if answer == "ok" else None,
                                                 error=None if answer == "ok" else {"code": "collector_failed",
                                                                                    "message": "<oops>"},
                                                 collected_at=iso(now)), agent, iso(now)))
    store.write(batch)


def test_a_job_page_shows_the_live_tally_then_the_stores_answers_late_ones_too(tmp_path, store) -> None:
    """While the job waits, its page and /api/job show the job's own tally; when the wait is over, the
    store's answers (by requests.job) over what the job concluded: an agent that did not answer in time
    is no_answer, until its late answer reaches the store; errors are shown escaped."""
    store.write(Batch(statuses=[Incoming(Status(agent_id="web-03", online=True, ts=iso(NOW - 900),
                                                labels={"role": "web"}), "web-03", iso(NOW - 900))]))
    hello(store, "web-03", False, NOW - 600)  # offline when the job starts, labels kept: queued
    runner = FakeRunner({"web-01": "error", "web-02": "no_answer"}, release=False)
    c, csrf = signed_in(tmp_path, store, runner=runner)
    job = ask_labels(c, csrf, type="cpu", labels={"role": "web"}).get_json()["job"]
    running = wait_job(c, job, "running")
    assert (running["targeted"], running["waiting"], running["line"]) == (
        2, 2, "targeted 2 · answered 0 (0%) · errors 0 · waiting 2 · queued 1")
    page = c.get(f"/job/{job}").get_data(as_text=True)
    assert 'data-running="1"' in page and 'id="job-targeted">2<' in page

    for agent in ("web-01", "web-02", "web-03"):
        stored_job_request(store, job, agent)
    runner.release.set()
    done = wait_job(c, job, "done")
    assert {k: done[k] for k in ("type", "targeted", "answered", "ok", "errors", "no_answer", "queued", "waiting")} \
        == {"type": "cpu", "targeted": 2, "answered": 1, "ok": 0, "errors": 1, "no_answer": 1, "queued": 1,
            "waiting": 0}
    assert done["selector"] == {"role": "web"}
    assert {r["agent_id"]: r["status"] for r in done["results"]} == {"web-01": "error", "web-02": "no_answer",
                                                                     "web-03": "queued"}

    stored_job_request(store, job, "web-02", "ok")  # late, after the wait: the store has it
    stored_job_request(store, job, "web-03", "ok")  # came back while its request waited at the broker
    later = c.get(f"/api/job/{job}").get_json()
    assert (later["targeted"], later["answered"], later["ok"], later["errors"], later["queued"]) == (3, 3, 2, 1, 0)
    assert next(r for r in later["results"] if r["agent_id"] == "web-02")["data"] == {"percent": 77.0}
    part = c.get(f"/job/{job}?partial=1").get_data(as_text=True)
    assert "<html" not in part and 'id="job-state">done<' in part
    assert "unknown_type: &lt;no such type&gt;" in part and "cpu 77%" in part
    assert re.findall(r'<tr class="job-row" data-agent="([^"]+)" data-status="([^"]+)"', part) == [
        ("web-01", "error"), ("web-02", "ok"), ("web-03", "ok")]


def test_a_job_the_dashboard_did_not_start_is_read_from_the_store(tmp_path, store) -> None:
    """A job sent by `fleetctl request --label` (or before a restart) shows the store's view; an
    unknown or malformed job id is a 404."""
    stored_job_request(store, "cli-job-1", "web-01", "ok")
    stored_job_request(store, "cli-job-1", "db-01")
    c = client(tmp_path, store)
    doc = c.get("/api/job/cli-job-1").get_json()
    assert doc["state"] == "stored" and (doc["targeted"], doc["ok"], doc["waiting"]) == (2, 1, 1)
    assert "read from the store" in c.get("/job/cli-job-1").get_data(as_text=True)
    assert c.get("/api/job/no-such-job").status_code == 404
    assert c.get("/job/not%20a%20job").status_code == 404
    assert c.get("/job/cli-job-1?limit=3").status_code == 400


def test_a_label_job_from_the_dashboard_over_a_real_broker(tmp_path, write_config, procs) -> None:
    """Against a real broker, persister and agents: an operator's label job from the dashboard asks
    the online role=web agents and queues the offline one; one answers unknown_type; every request
    record carries the job; when the offline agent comes back, its late answer shows on the job."""
    cfg = write_config(dashboard={"ask_enabled": True, "operator_token": "s3cret-token", "ask_timeout_s": 5})
    db = tmp_path / "fleet.db"
    procs.start_persister(cfg)
    away = write_config("away", agent={"id": "away-01", "labels": {"role": "web"}})
    procs.start("away", "fleet-agent", "--config", str(away))
    online = lambda: {r["agent_id"]: r["online"] for r in rows(db, "SELECT agent_id, online FROM agents")}  # noqa: E731
    wait_for(lambda: online().get("away-01") == 1, what="the real agent online in the store")
    procs.stop("away")
    wait_for(lambda: online().get("away-01") == 0, what="the real agent offline in the store")
    start_sim(procs, tmp_path, cfg, "web", 2, "--types", "cpu,ping", "--label", "role=web")
    start_sim(procs, tmp_path, cfg, "old", 1, "--types", "cpu", "--label", "role=web")  # no ping: unknown_type
    start_sim(procs, tmp_path, cfg, "db", 1, "--types", "cpu,ping", "--label", "role=db")
    wait_for(lambda: len(online()) == 5, what="every agent in the store")

    store = SqliteStore(str(db))
    try:
        c = create_app(load_config(str(cfg)), store).test_client()
        bearer = {"Authorization": "Bearer s3cret-token"}
        started = c.post("/api/jobs", json={"type": "ping", "labels": {"role": "web"}}, headers=bearer)
        assert started.status_code == 202, started.get_json()
        job = started.get_json()["job"]
        done = wait_job(c, job, "done")
        assert {k: done[k] for k in ("targeted", "answered", "ok", "errors", "no_answer", "queued")} == \
            {"targeted": 3, "answered": 3, "ok": 2, "errors": 1, "no_answer": 0, "queued": 1}
        status = {r["agent_id"]: r["status"] for r in done["results"]}
        assert status == {"away-01": "queued", "old-1": "error", "web-1": "ok", "web-2": "ok"}
        wait_for(lambda: len(rows(db, "SELECT id FROM requests WHERE job = ?", job)) == 4,
                 what="the job's four requests stored with its id")

        procs.start("away", "fleet-agent", "--config", str(away))  # back: the broker delivers what waited
        late = wait_for(lambda: (d := c.get(f"/api/job/{job}").get_json())["queued"] == 0 and d, 30,
                        what="the late answer on the job")
        assert (late["targeted"], late["ok"], late["errors"]) == (4, 3, 1)
        html = c.get(f"/job/{job}").get_data(as_text=True)
        assert 'data-agent="away-01" data-status="ok"' in html and "unknown_type" in html
    finally:
        store.close()


def test_wrong_bearer_tokens_for_a_label_job_count_toward_the_lockout(tmp_path, store) -> None:
    """Starting a label job goes through the same token counting as asking one agent: wrong bearer
    tokens at /api/jobs lock the address out, the right token then gets 429, and no job starts."""
    runner = FakeRunner()
    app = create_app(config(tmp_path, ask_enabled=True, operator_token="s3cret-token"), store, FakeAsker(), runner)
    c = app.test_client()
    body = {"type": "cpu", "labels": {"role": "web"}}
    for n in range(5):
        got = c.post("/api/jobs", json=body, headers={"Authorization": f"Bearer guess-{n}"})
        assert got.status_code == 403
    locked = c.post("/api/jobs", json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert locked.status_code == 429 and locked.is_json and locked.headers["Retry-After"] == "300"
    assert runner.runs == []


def test_at_most_so_many_jobs_wait_at_once(tmp_path, store) -> None:
    """Beyond max_running jobs still waiting, a new one gets 429 and is not started; once one is done,
    the next may start."""
    runner = FakeRunner(release=False)
    c, csrf = signed_in(tmp_path, store, runner=runner)
    c.application.extensions["fleet_jobs"].max_running = 1
    first = ask_labels(c, csrf, type="cpu", labels={"role": "web"}).get_json()["job"]
    refused = ask_labels(c, csrf, type="cpu", labels={"role": "db"})
    assert refused.status_code == 429 and "still waiting" in refused.get_json()["error"]
    runner.release.set()
    wait_job(c, first, "done")
    assert ask_labels(c, csrf, type="cpu", labels={"role": "db"}).status_code == 202
    assert [spec.selector for _, spec, _ in runner.runs] == [{"role": "web"}, {"role": "db"}]


LABEL_KEYS = st.from_regex(r"\A[a-z][a-z0-9_]{0,31}\Z")
LABEL_VALUES = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")


@settings(max_examples=examples(200), deadline=None)
@given(filter_=st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=4), key=LABEL_KEYS, value=LABEL_VALUES,
       q=st.text(max_size=20), desc=st.booleans())
def test_a_label_link_reads_back_as_the_filter_it_names(filter_, key, value, q, desc) -> None:
    """Whatever the labels and the rest of the query, a label link's query string parses back to the
    filter it promises (key=value in place of that key's other value) with the rest kept, and the
    link that drops a pair to the filter without it."""
    query = FleetQuery(q=q.strip(), labels=filter_, sort="cpu", desc=desc)
    links = LabelLinks("/", query)

    def read(href: str) -> FleetQuery:
        return FleetQuery.from_args(MultiDict(parse_qsl(urlsplit(href).query, keep_blank_values=True)))

    got = read(links.only(key, value))
    assert got.labels == {**{k: v for k, v in filter_.items() if k != key}, key: value}
    assert (got.q, got.sort, got.desc, got.page) == (query.q, "cpu", desc, 1)
    if filter_:
        drop = next(iter(filter_))
        assert read(links.without(drop)).labels == {k: v for k, v in filter_.items() if k != drop}
    assert read(links.none()).labels == {}
def test_charts_beyond_the_raw_window_are_drawn_from_the_hourly_trends(tmp_path) -> None:
    """A range longer than the raw answers are kept (persister.retention_s) charts each hour's average
    from the trends: answers of 40 days ago, whose raw records are purged, still show as two hours."""
    store = SqliteStore(str(tmp_path / "trends.db"))
    hour = float(int(NOW) // 3600 * 3600 - 40 * 86400)
    cpu = [(hour + 60, 10.0), (hour + 600, 20.0), (hour + 1200, 30.0), (hour + 3660, 50.0), (hour + 4000, 70.0)]
    for n, (at, percent) in enumerate(cpu):
        answer(store, "old-01", "cpu", {"percent": percent, "load_avg": [0.1, 0.1, 0.1]}, at, n)
        answer(store, "old-01", "disk", {"partitions": [{"mountpoint": "/", "percent": percent / 2},
                                                        {"mountpoint": "/var", "percent": percent}]}, at, n)
    for n in range(3):
        answer(store, "old-01", "network", {"interfaces": [
            {"name": "lo", "bytes_recv": 10**9 * n, "bytes_sent": 0},
            {"name": "eth0", "bytes_recv": 6000 * n, "bytes_sent": 600 * n}]}, hour + 100 + 60 * n, n)
    store.purge(NOW)
    assert store.count_requests() == 0
    try:
        web = client(tmp_path, store)
        doc = web.get("/api/agent/old-01/series?range=90d").get_json()
        assert doc["cpu"]["t"] == [hour, hour + 3600] and doc["cpu"]["lines"] == {"cpu %": [20.0, 60.0]}
        assert doc["disk"]["lines"] == {"/var": [20.0, 60.0], "/": [10.0, 30.0]}
        assert doc["network"]["t"] == [hour]
        assert doc["network"]["lines"]["received B/s"][0] == pytest.approx(100, rel=0.01)  # loopback left out
        assert doc["network"]["lines"]["sent B/s"][0] == pytest.approx(10, rel=0.01)
        assert doc["memory"]["t"] == []
        assert web.get("/api/agent/old-01/series?range=7d").get_json()["cpu"]["t"] == []  # raw: purged
    finally:
        store.close()
