"""The dashboard in a real headless Chromium against a running stack (broker, persister, controller,
agents and dashboard as processes, every type asked each second).

Needs Debian's chromium and chromium-driver (`make test` installs them through
scripts/ensure-chromium.sh); without them these tests are skipped, saying why. Set
FLEET_TEST_SCREENSHOTS=docs/img to refresh the screenshots in docs/dashboard.md from a run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import BUILTIN_TYPES, parse_iso
from fleetctl.broker import free_port

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
except ImportError:  # pragma: no cover - reported by the skip below
    webdriver = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).exists()),
                    None)
TOKEN = "browser-test-operator-token"


def wait_page(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.1,
              what: str = "condition") -> Any:
    """wait_for on a live page: a refresh redraws what was just found, and reading it then raises
    StaleElementReferenceException, which means "look again", not failure."""
    def check() -> Any:
        try:
            return predicate()
        except StaleElementReferenceException:
            return False

    return wait_for(check, timeout_s, interval_s, what)


def missing() -> str:
    if webdriver is None:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium and its driver are not installed: run 'bash scripts/ensure-chromium.sh' (as root: " \
               "apt-get install chromium chromium-driver)"
    return ""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    why = missing()
    if why:
        print(f"SKIP browser tests: {why}")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1300", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def stack(write_config: Callable[..., Path], procs: Any, **dashboard: Any) -> str:
    """Persister, controller, agents host-a and host-b, and the dashboard; returns its URL."""
    port = free_port()
    cfg = write_config(controller={"schedule": {t: 1 for t in BUILTIN_TYPES}},
                       dashboard={"port": port, "refresh_s": 1, **dashboard})
    procs.start_persister(cfg)
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    for agent, role in (("host-a", "web"), ("host-b", "db")):
        procs.start(agent, "fleet-agent", "--config",
                    str(write_config(agent, agent={"id": agent, "labels": {"role": role}})))
    procs.start("dashboard", "fleetctl", "--config", str(cfg), "dashboard")
    return f"http://127.0.0.1:{port}"


def screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    folder = os.environ.get("FLEET_TEST_SCREENSHOTS")
    target = (ROOT / folder if folder else tmp_path) / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(target))


def rows(driver: Any) -> list:
    return [r.get_attribute("data-agent") for r in driver.find_elements(By.CSS_SELECTOR, "tr.agent-row")]


def test_fleet_agent_and_rejected_pages_in_a_browser(tmp_path, broker, prefix, write_config, procs, browser) -> None:
    """The fleet page lists both agents (and refreshes, sorts and filters in place), an agent page
    draws CPU, memory, disk and network charts with data points and lists processes, and the
    rejected page shows a malformed answer's reason; read-only, so no ask button."""
    url = stack(write_config, procs)
    wait_page(lambda: _ok(url), 20, what="the dashboard to answer")
    browser.get(url + "/")
    wait_page(lambda: sorted(rows(browser)) == ["host-a", "host-b"] or browser.refresh(), 40, interval_s=1,
             what="both agents on the fleet page")
    wait_page(lambda: browser.find_element(By.ID, "count-online").text == "2", 20, what="2 online")
    wait_page(lambda: "%" in browser.find_element(By.CSS_SELECTOR, 'tr[data-agent="host-a"]').text, 30,
             what="host-a's CPU, memory and disk readings")
    screenshot(browser, tmp_path, "fleet")
    stamp = browser.find_element(By.ID, "fleet").get_attribute("data-refreshed-at")
    wait_page(lambda: browser.find_element(By.ID, "fleet").get_attribute("data-refreshed-at") != stamp, 10,
             what="a live refresh without reloading")
    browser.find_element(By.CSS_SELECTOR, 'a[data-sort="agent_id"]').click()  # ascending -> descending
    wait_page(lambda: rows(browser) == ["host-b", "host-a"], 10, what="the table sorted by agent, descending")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-agent="host-b"] a.label').click()  # role=db
    wait_page(lambda: rows(browser) == ["host-b"], 10, what="the label filter to leave host-b alone")
    assert "label=role%3Ddb" in browser.current_url and "sort=agent_id" in browser.current_url
    browser.find_element(By.LINK_TEXT, "all agents").click()
    wait_page(lambda: rows(browser) == ["host-b", "host-a"], 10, what="both agents again, still sorted")
    search = browser.find_element(By.CSS_SELECTOR, "#fleet-filters input[name=q]")
    search.send_keys("host-a")
    wait_page(lambda: rows(browser) == ["host-a"], 10, what="the filter to leave host-a alone")

    browser.get(url + "/agent/host-a?range=15m")

    def points(name: str) -> int:
        return int(browser.find_element(By.ID, f"chart-{name}").get_attribute("data-points") or 0)

    wait_page(lambda: all(points(n) >= 3 for n in ("cpu", "memory", "disk", "network")), 40, interval_s=0.5,
             what="every chart drawn with at least 3 data points")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-cpu canvas")
    if os.environ.get("FLEET_TEST_SCREENSHOTS"):  # a fuller chart for docs/dashboard.md
        wait_page(lambda: points("cpu") >= 20, 60, interval_s=1, what="20 CPU points")
    wait_page(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#processes tbody tr")) > 3, 20,
             what="the process list")
    browser.find_element(By.CSS_SELECTOR, "#processes th:nth-child(6)").click()  # rss, largest first
    rss = [int(td.get_attribute("data-v")) for td in browser.find_elements(By.CSS_SELECTOR,
                                                                          "#processes tbody td:nth-child(6)")]
    assert rss == sorted(rss, reverse=True)
    assert "Linux" in browser.find_element(By.ID, "os-info").text
    assert "ok" in browser.find_element(By.ID, "recent-requests").text
    assert not browser.find_elements(By.ID, "ask-button")
    screenshot(browser, tmp_path, "agent")

    publish_garbage(broker.port, f"{prefix}/host-a/res/cpu", b'{"id": "no-such", "status": "maybe"')
    browser.get(url + "/rejected")
    wait_page(lambda: f"{prefix}/host-a/res/cpu" in browser.find_element(By.ID, "rejected-table").text, 20,
             what="the malformed answer on the rejected page (live)")
    screenshot(browser, tmp_path, "rejected")


def test_ask_now_as_an_operator_shows_a_fresh_answer(tmp_path, broker, write_config, procs, browser) -> None:
    """With asking enabled, an operator signs in, presses "ask now" on an agent page and sees the
    agent's fresh answer, collected after the press; then filters the fleet page by a label, asks
    that selection, and the job's page shows its tally and each agent's answer."""
    url = stack(write_config, procs, ask_enabled=True, operator_token=TOKEN)
    wait_page(lambda: _ok(url), 20, what="the dashboard to answer")
    browser.get(url + "/agent/host-b")
    assert not browser.find_elements(By.ID, "ask-button")  # not signed in
    browser.get(url + "/signin?next=/agent/host-b")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, ".signin button").click()
    wait_page(lambda: browser.find_elements(By.ID, "ask-button"), 10, what="the ask button after signing in")
    wait_page(lambda: _agent_known(url, "host-b"), 30, what="host-b online")
    Select(browser.find_element(By.ID, "ask-type")).select_by_visible_text("memory")
    pressed = time.time()
    browser.find_element(By.ID, "ask-button").click()
    answer = browser.find_element(By.ID, "ask-answer")
    wait_page(lambda: answer.get_attribute("data-answer-id"), 20, what="the answer to be shown")
    shown = json.loads(answer.text)
    assert shown["agent_id"] == "host-b" and shown["type"] == "memory" and shown["status"] == "ok"
    assert shown["data"]["virtual"]["total"] > 0 and parse_iso(shown["collected_at"]) >= pressed - 1
    assert "answered ok" in browser.find_element(By.ID, "ask-status").text
    screenshot(browser, tmp_path, "ask")

    # a label selection: filter the fleet page by host-a's role=web, ask it, follow the job's tally
    browser.get(url + "/")
    assert browser.find_element(By.ID, "ask-labels").get_attribute("hidden") is not None  # no label filter yet
    wait_page(lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-agent="host-a"] a.label'), 20,
              what="host-a's label").click()
    wait_page(lambda: rows(browser) == ["host-a"] and browser.find_element(By.ID, "ask-labels").is_displayed(), 10,
              what="the fleet filtered by role=web, and the ask panel shown")
    assert browser.find_element(By.ID, "ask-labels-button").text == "Ask the agents labelled role=web now"
    screenshot(browser, tmp_path, "fleet-labels")
    Select(browser.find_element(By.ID, "ask-labels-type")).select_by_visible_text("cpu")
    browser.find_element(By.ID, "ask-labels-button").click()
    wait_page(lambda: "/job/" in browser.current_url, 10, what="the job's page")
    wait_page(lambda: browser.find_element(By.ID, "job-state").text == "done", 20, what="the job done")
    assert browser.find_element(By.ID, "job-targeted").text == "1"
    assert browser.find_element(By.ID, "job-answered").text == "1"
    assert browser.find_element(By.CSS_SELECTOR, 'tr.job-row[data-agent="host-a"]').get_attribute(
        "data-status") == "ok"
    assert "cpu " in browser.find_element(By.ID, "job-results").text
    screenshot(browser, tmp_path, "job")


def _ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _agent_known(url: str, agent: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url + "/api/fleet?q=" + agent, timeout=5) as resp:
        return any(a["agent_id"] == agent and a["state"] == "online" for a in json.loads(resp.read())["agents"])


def publish_garbage(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
