"""End to end with real processes: broker, persister, controller and agents."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from conftest import wait_for
from helpers import loads, rows

from fleet_common import BUILTIN_TYPES, iso, parse_iso

ALL_EVERY_SECOND = {t: 1 for t in BUILTIN_TYPES}


def answered_types(db: Path, agent: str, at_least: int) -> set:
    got = rows(db, "select type, count(*) n from requests where agent_id=? and state='ok' group by type", agent)
    return {r["type"] for r in got if r["n"] >= at_least}


def test_every_type_is_answered_and_stored_for_two_agents(tmp_path, write_config, procs) -> None:
    """With 1-second intervals, both agents answer every built-in type and each answer is stored
    with state ok, its data, and a latency that matches its timestamps."""
    db = tmp_path / "fleet.db"
    cfg = write_config(controller={"schedule": ALL_EVERY_SECOND})
    procs.start_persister(cfg)
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    for agent in ("host-a", "host-b"):
        procs.start(agent, "fleet-agent", "--config", str(write_config(agent, agent={"id": agent})))
    for agent in ("host-a", "host-b"):
        wait_for(lambda a=agent: answered_types(db, a, 3) == set(BUILTIN_TYPES), 40,
                 what=f"three stored answers of every type from {agent}")

    stored = rows(db, "select * from requests where state='ok'")
    for rec in stored:
        issued, answered = parse_iso(rec["issued_at"]), parse_iso(rec["answered_at"])
        assert rec["latency_ms"] is not None
        assert abs(rec["latency_ms"] - (answered - issued) * 1000) < 2, rec["id"]
        assert 0 <= rec["latency_ms"] < 5000, rec
        assert isinstance(loads(rec["data"]), dict) and rec["error"] in (None, "null")
    cpu = loads(next(r for r in stored if r["type"] == "cpu")["data"])
    assert 0.0 <= cpu["percent"] <= 100.0 and cpu["per_cpu"]

    agents = {a["agent_id"]: a for a in rows(db, "select * from agents")}
    assert set(agents) >= {"host-a", "host-b"}
    assert all(agents[a]["online"] for a in ("host-a", "host-b"))
    assert sorted(loads(agents["host-a"]["types"])) == sorted(BUILTIN_TYPES)

    procs.stop("host-b")
    wait_for(lambda: rows(db, "select online from agents where agent_id='host-b'")[0]["online"] in (0, False),
             15, what="host-b recorded offline after a clean stop")


def test_offline_agent_gets_queued_requests_and_expired_ones_are_never_collected(
        tmp_path, write_config, procs) -> None:
    """Requests sent while an agent is away wait at the broker (persistent session); those still
    valid are answered when it returns, those that expired meanwhile end `expired`, none late."""
    db = tmp_path / "fleet.db"
    interval = 3
    cfg = write_config(controller={"schedule": {"cpu": interval}})
    agent_cfg = write_config("agent", agent={"id": "roamer"})
    procs.start_persister(cfg)
    procs.start("controller", "fleet-controller", "--config", str(cfg))
    procs.start("agent", "fleet-agent", "--config", str(agent_cfg))
    wait_for(lambda: answered_types(db, "roamer", 1) == {"cpu"}, 30, what="a first answer")

    assert procs.stop("agent", signal.SIGTERM) == 0
    went = time.time()
    # Wait until at least three requests were issued while it was away.
    wait_for(lambda: len(rows(db, "select id from requests where issued_at > ?", iso(went))) >= 3,
             30, what="requests issued while the agent is away")
    procs.start("agent2", "fleet-agent", "--config", str(agent_cfg))
    back = time.time()

    def settled() -> list:
        away = rows(db, "select * from requests where issued_at > ? and issued_at < ?", iso(went), iso(back))
        return away if away and all(r["state"] != "pending" for r in away) else []

    away = wait_for(settled, 30, what="every request of the away period answered or expired")
    states = [r["state"] for r in away]
    assert "expired" in states, states
    late_ok = [r for r in away if r["state"] == "ok" and parse_iso(r["answered_at"]) >= back]
    assert late_ok, f"no request queued while away was answered after the return: {states}"
    for r in away:
        assert r["state"] in ("ok", "expired"), r
        if r["state"] == "ok":
            assert parse_iso(r["answered_at"]) <= parse_iso(r["expires_at"]), f"collected late: {r}"

