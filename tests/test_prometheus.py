"""The exposition as Prometheus and Grafana see it: a real Prometheus (Debian's package; `make test`
installs it through scripts/ensure-prometheus.sh, else these tests skip saying why) scrapes a real
dashboard process and answers queries with the newest stored answers; promtool checks and unit-tests
the example alerts; the Grafana dashboard and the alerts use only names the exposition produces;
the compose stack provisions both."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from test_exposition import Samples, answer, expected, hello, without_ages

from fleet_common.config import load_config
from fleet_dashboard.exposition import exposed_names
from fleet_store.sqlite import SqliteStore
from fleetctl.broker import free_port

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "docs" / "grafana" / "fleet.json"
INSTALL = "run 'bash scripts/ensure-prometheus.sh' (as root: apt-get install --no-install-recommends prometheus)"
TOKEN = "prometheus-test-token-0123456789"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed: {INSTALL}")
    return path


def promtool(*args: str) -> str:
    done = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_example_alert_rules() -> None:
    """docs/prometheus/alerts.yml is valid rules, and fires as its unit tests say: agent offline, a
    disk over 90%, an online agent with no current answers."""
    assert "SUCCESS: 3 rules found" in promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in promtool("test", "rules", str(ALERTS.with_name("alerts_test.yml")))


def test_promtool_checks_the_compose_stacks_prometheus_config() -> None:
    """The Prometheus config the compose stack mounts is valid, with its rule file."""
    promtool("check", "config", str(ROOT / "docs" / "prometheus" / "prometheus.yml"))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfleet_[a-z0-9_]+\b", expr))


def grafana_exprs() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
                [e for v in node.values() for e in walk(v)]
        return [e for v in node for e in walk(v)] if isinstance(node, list) else []

    return walk(json.loads(GRAFANA.read_text()))


def test_the_grafana_dashboard_and_alerts_query_only_exposed_names() -> None:
    """Every fleet_* name in the Grafana dashboard's queries and in the alert rules is one the
    exposition produces, so the two cannot drift apart; and together they use every name."""
    exprs = grafana_exprs()
    assert len(exprs) > 20
    used = {name for e in exprs for name in metric_names(e)}
    rules = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    alerted = {name for e in rules for name in metric_names(e)}
    assert used | alerted <= exposed_names(), sorted((used | alerted) - exposed_names())
    assert used == exposed_names(), f"not charted: {sorted(exposed_names() - used)}"


def test_the_grafana_dashboard_has_an_overview_and_a_host_chosen_by_agent_id() -> None:
    doc = json.loads(GRAFANA.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert "fleet_agent_" in variables["agent_id"]["definition"] and not variables["agent_id"]["multi"]
    titles = [p["title"] for p in doc["panels"]]
    assert titles[0] == "Fleet" and "Host $agent_id" in titles
    host = titles.index("Host $agent_id")
    for p in doc["panels"][host + 1:]:
        assert all('agent_id="$agent_id"' in t["expr"] for t in p["targets"]), p["title"]
    assert {"prometheus", "grafana"} <= set(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def test_compose_provisions_prometheus_and_grafana_from_files_in_the_repository() -> None:
    """The prometheus and grafana services mount files that exist; Prometheus scrapes the dashboard
    service on its port, which serves /metrics; Grafana loads the dashboard from docs/grafana."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in doc["volumes"]
    config = yaml.safe_load((ROOT / "docs" / "prometheus" / "prometheus.yml").read_text())
    fleet = next(job for job in config["scrape_configs"] if job["job_name"] == "fleet")
    port = services["dashboard"]["environment"]["FLEET_DASHBOARD_PORT"]
    assert fleet["static_configs"][0]["targets"] == [f"dashboard:{port}"]
    env = {k: str(v) for k, v in services["dashboard"]["environment"].items() if k.startswith("FLEET_")}
    assert load_config(None, env=env).dashboard.metrics_enabled is True
    provider = yaml.safe_load((ROOT / "docs/grafana/provisioning/dashboards/fleet.yml").read_text())["providers"][0]
    assert any(v.endswith(f":{provider['options']['path']}/fleet.json:ro") for v in services["grafana"]["volumes"])


# ------------------------------------------------------------------ a real Prometheus

def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def as_samples(result: list[dict[str, Any]]) -> Samples:
    skip = {"__name__", "job", "instance"}
    return {(r["metric"]["__name__"], frozenset((k, v) for k, v in r["metric"].items() if k not in skip)):
            float(r["value"][1]) for r in result}


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_newest_stored_answers(tmp_path: Path, procs: Any) -> None:
    """Prometheus scrapes a running dashboard with the metrics token, and its query API returns
    the newest stored answer of each agent, without the stale ones; it loads the alert rules."""
    prometheus = tool("prometheus")
    db = tmp_path / "fleet.db"
    store = SqliteStore(str(db))
    now = time.time()
    for n, agent in enumerate(("web-01", "web-02", "stale-01")):
        hello(store, agent, True, now)
        age = 600 if agent == "stale-01" else 20  # stale-01's cpu, memory and network are ten intervals old
        answer(store, agent, "cpu", {"percent": 10.0 + n, "load_avg": [0.5, 0.25, 0.125]}, now - age - 60, 0)
        answer(store, agent, "cpu", {"percent": 20.5 + n, "load_avg": [1.5, 1.25, 1.125]}, now - age, 1)
        answer(store, agent, "memory", {"virtual": {"percent": 41.5, "available": 3 << 30}, "swap": None}, now - age)
        answer(store, agent, "disk", {"partitions": [{"mountpoint": "/", "percent": 93.25, "free": 7 << 30},
                                                     {"mountpoint": "/srv", "percent": 12.0, "free": 1 << 40}]},
               now - 100)
        answer(store, agent, "network", {"interfaces": [{"name": "eth0", "bytes_recv": 10 ** 12 + n,
                                                         "bytes_sent": 5 * 10 ** 9}]}, now - age)
        answer(store, agent, "processes", {"processes": [], "total": 120 + n}, now - 100)
    store.close()
    port, prom_port = free_port(), free_port()
    config = tmp_path / "dashboard.yaml"
    config.write_text(yaml.safe_dump({
        "persister": {"sqlite_path": str(db)},
        "dashboard": {"port": port, "metrics_refresh_s": 1, "metrics_token": TOKEN}, "log": {"level": "debug"}}))
    procs.start("dashboard", "fleet-dashboard", "--config", str(config))
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "fleet", "authorization": {"credentials_file": str(tmp_path / "token")},
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "ab")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        def scraped() -> bool:
            try:
                return len(query(base, 'fleet_agent_online{job="fleet"}')) == 3
            except OSError:
                return proc.poll() is not None  # ends the wait; the assert below says why
        assert wait_for(scraped, timeout_s=60), (tmp_path / "prometheus.log").read_text()[-3000:]
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert query(base, 'up{job="fleet"}')[0]["value"][1] == "1"
        got = as_samples(query(base, '{__name__=~"fleet_.+", job="fleet"}'))
        cfg = load_config(None, env={})
        store = SqliteStore(str(db))
        try:
            for agent in ("web-01", "web-02", "stale-01"):
                mine = {(name, labels - {("agent_id", agent)}): v for (name, labels), v in got.items()
                        if ("agent_id", agent) in labels and name != "fleet_agent_info"}
                want = expected(store, agent, time.time(), cfg.controller.schedule)
                assert without_ages(mine) == without_ages(want) | {
                    ("fleet_agent_online", frozenset()): 1.0, ("fleet_requests_answered_ratio", frozenset()): 1.0}
                assert {k for k in mine if k[0] == "fleet_answer_age_seconds"} == \
                    {k for k in want if k[0] == "fleet_answer_age_seconds"}
        finally:
            store.close()
        assert as_samples(query(base, 'fleet_cpu_percent{agent_id="web-02"}')) == {
            ("fleet_cpu_percent", frozenset({("agent_id", "web-02")})): 21.5}
        assert query(base, 'fleet_cpu_percent{agent_id="stale-01"}') == []
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == {"FleetAgentOffline", "FleetDiskAlmostFull", "FleetAgentNotAnswering"}
        assert all(r["health"] in ("ok", "unknown") for r in rules.values()), rules
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
