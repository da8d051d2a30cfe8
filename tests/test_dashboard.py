"""The dashboard over a real SQLite store, through Flask's test client: what each page shows,
sorting and filtering, the series behind the charts, and who may press "ask now"."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, wait_for
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conforming

from fleet_common import Request, Response, Status, iso
from fleet_common.cli import run_main
from fleet_common.config import Config, ConfigError, load_config
from fleet_common.datatypes import BUILTIN as DATATYPES
from fleet_dashboard.app import create_app
from fleet_dashboard.data import network_series
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


def hello(store: SqliteStore, agent: str, online: bool, at: float) -> None:
    extra: dict[str, Any] = {"hostname": f"{agent}.example", "platform": "Linux-6.1-x86_64", "agent_version": "0.1.0",
                             "types": ["cpu", "disk", "memory", "network", "os_info", "ping", "processes"]}
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


def client(tmp_path: Path, store: SqliteStore, asker: FakeAsker | None = None, **dashboard: Any) -> Any:
    return create_app(config(tmp_path, **dashboard), store, asker or FakeAsker()).test_client()


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
    ("/api/fleet?partial=1", "partial", ["dir", "page", "per", "q", "sort", "state"]),
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


def signed_in(tmp_path: Path, store: SqliteStore, asker: FakeAsker | None = None, **dashboard: Any) -> tuple[Any, str]:
    """A test client signed in as an operator, and the CSRF token its pages carry."""
    c = client(tmp_path, store, asker, ask_enabled=True, operator_token="s3cret-token", **dashboard)
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
