"""Jobs (`fleetctl request --all|--label`, `fleetctl job`) against a real broker, persister,
agent and simulated fleet; and the job's parts that need no network."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Procs, start_sim, wait_for
from helpers import rows

from fleet_common import Status, Topics
from fleet_common.errors import FleetError
from fleet_common.jobs import AgentResult, Candidate, JobResult, JobSpec, Tally, candidates, select
from fleet_store import AgentRecord, RequestRecord
from fleet_store.jobs import stored_job


def fleetctl(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetctl"), "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=timeout)


def job_json(cfg: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = fleetctl(cfg, "request", *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def by_agent(result: dict[str, Any]) -> dict[str, str]:
    return {r["agent_id"]: r["status"] for r in result["results"]}


def agents_online(db: Path) -> dict[str, bool]:
    return {r["agent_id"]: bool(r["online"]) for r in rows(db, "SELECT agent_id, online FROM agents")}


def test_jobs_count_the_queued_offline_agent_and_the_error_and_fleetctl_job_shows_the_late_answer(
        tmp_path: Path, write_config: Callable[..., Path], procs: Procs) -> None:
    """--label and --all jobs: an agent that is offline is queued, one without the type answers
    unknown_type, the rest ok; every request record carries its job; when the offline agent comes
    back, `fleetctl job` shows its answer, which arrived after the job stopped waiting."""
    cfg = write_config()
    db = tmp_path / "fleet.db"
    procs.start_persister(cfg)
    away = write_config("away", agent={"id": "away-01", "labels": {"role": "web"}})
    procs.start("away", "fleet-agent", "--config", str(away))
    wait_for(lambda: agents_online(db).get("away-01"), what="the real agent's birth in the store")
    procs.stop("away")  # a clean stop: offline, its session (and so its subscription) kept at the broker
    wait_for(lambda: agents_online(db).get("away-01") is False, what="the agent offline in the store")
    start_sim(procs, tmp_path, cfg, "web", 3, "--types", "cpu,ping", "--label", "role=web")
    start_sim(procs, tmp_path, cfg, "old", 1, "--types", "cpu", "--label", "role=web")  # no ping: unknown_type
    start_sim(procs, tmp_path, cfg, "db", 2, "--types", "cpu,ping", "--label", "role=db")

    code, web = job_json(cfg, "--label", "role=web", "ping")
    assert code == 1, "one targeted agent answered an error"
    assert {k: web[k] for k in ("type", "targeted", "answered", "ok", "errors", "no_answer", "queued")} == \
        {"type": "ping", "targeted": 4, "answered": 4, "ok": 3, "errors": 1, "no_answer": 0, "queued": 1}
    assert by_agent(web) == {"away-01": "queued", "old-1": "error", "web-1": "ok", "web-2": "ok", "web-3": "ok"}
    old = next(r for r in web["results"] if r["agent_id"] == "old-1")
    assert old["error"]["code"] == "unknown_type" and old["data"] is None
    ok = next(r for r in web["results"] if r["agent_id"] == "web-1")
    assert ok["data"] == {} and ok["error"] is None and ok["latency_ms"] > 0

    code, every = job_json(cfg, "--all", "ping", "--timeout", "5")
    assert code == 1
    assert (every["targeted"], every["ok"], every["errors"], every["queued"]) == (6, 5, 1, 1)
    assert by_agent(every)["db-1"] == by_agent(every)["db-2"] == "ok"

    done = fleetctl(cfg, "request", "--label", "role=db", "ping")  # the table, and exit 0: all ok
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["AGENT", "STATUS", "LATENCY", "RESULT"]
    assert [line.split()[:2] for line in lines[1:]] == [["db-1", "ok"], ["db-2", "ok"]]
    assert "targeted 2 · answered 2 (100%)" in done.stderr

    def job_records(job: str) -> list[dict[str, Any]]:
        return rows(db, "SELECT id, agent_id, job FROM requests WHERE job = ?", job)

    wait_for(lambda: len(job_records(web["job"])) == 5, what="the --label job's five requests stored")
    wait_for(lambda: len(job_records(every["job"])) == 7, what="the --all job's seven requests stored")
    stored = {r["id"]: r for r in rows(db, "SELECT id, agent_id, job FROM requests WHERE type = 'ping'")}
    for result in (web, every):
        for r in result["results"]:  # each request the job sent is stored with its agent and its job
            assert stored[r["request_id"]]["job"] == result["job"], r
            assert stored[r["request_id"]]["agent_id"] == r["agent_id"], r

    before = json.loads(fleetctl(cfg, "job", web["job"], "--json").stdout)
    assert by_agent(before)["away-01"] == "queued" and before["queued"] == 1
    procs.start("away", "fleet-agent", "--config", str(away))  # back: the broker delivers what waited

    def late() -> dict[str, Any] | None:
        done = fleetctl(cfg, "job", web["job"], "--json")
        result = json.loads(done.stdout) if done.stdout else {}
        return result if by_agent(result).get("away-01") == "ok" else None

    after = wait_for(late, 30, interval_s=0.3, what="the late answer in 'fleetctl job'")
    assert (after["targeted"], after["answered"], after["ok"], after["errors"], after["queued"]) == (5, 5, 4, 1, 0)
    text = fleetctl(cfg, "job", web["job"])
    assert text.returncode == 1 and "away-01" in text.stdout and "unknown_type" in text.stdout
    assert "targeted 5 · answered 5 (100%) · errors 1 · queued 0" in text.stdout


def test_an_online_agent_that_does_not_answer_is_no_answer_and_nothing_matching_is_said(
        broker: Any, prefix: str, write_config: Callable[..., Path]) -> None:
    """An agent whose status says online but that never answers is no_answer after --timeout
    (exit 1); a selection nothing matches sends nothing and says so (exit 1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    cfg = write_config()
    topics = Topics(prefix)
    mute = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mute-publisher", protocol=mqtt.MQTTv5)
    mute.connect("127.0.0.1", broker.port)
    mute.loop_start()
    try:
        birth = Status(agent_id="mute-01", online=True, types=["ping"], labels={"role": "mute"})
        mute.publish(topics.status("mute-01"), birth.payload(), qos=1, retain=True).wait_for_publish(10)
        code, result = job_json(cfg, "--label", "role=mute", "ping", "--timeout", "1")
        assert code == 1
        assert (result["targeted"], result["answered"], result["no_answer"], result["queued"]) == (1, 0, 1, 0)
        assert result["results"][0]["status"] == "no_answer" and result["results"][0]["latency_ms"] is None
    finally:
        mute.loop_stop()
        mute.disconnect()
    done = fleetctl(cfg, "request", "--label", "role=nothing", "ping")
    assert done.returncode == 1 and "no known agent is one of agents labelled role=nothing" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr


def test_with_no_status_at_the_broker_the_store_is_the_fleet(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    """A broker with no retained status (it lost them, or drops what this user may not read): the
    job asks the agents the store knows, online or queued as the store last heard."""
    from fleet_common import iso
    from fleet_store import Batch, Incoming
    from fleet_store.sqlite import SqliteStore

    cfg = write_config()
    store = SqliteStore(str(tmp_path / "fleet.db"))
    now = iso(1_800_000_000)
    store.write(Batch(statuses=[Incoming(Status("st-1", True, ts=now, labels={"role": "x"}), "st-1", now),
                                Incoming(Status("st-2", True, ts=now, labels={"role": "x"}), "st-2", now),
                                Incoming(Status("st-2", False, ts=now), "st-2", iso(1_800_000_001))]))
    store.close()
    code, result = job_json(cfg, "--label", "role=x", "ping", "--timeout", "1")
    assert code == 1 and by_agent(result) == {"st-1": "no_answer", "st-2": "queued"}


@pytest.mark.parametrize("args,says", [
    (("request", "--all", "ping", "web-01"), "with --all or --label give only the type"),
    (("request", "--label", "role", "ping"), "--label"),
    (("request", "--label", "Role=web", "ping"), "label key"),
    (("request", "--all", "--label", "role=web", "ping"), "not both"),
    (("request", "web-01"), "give an agent and a type"),
    (("request", "web-01", "ping", "--expires", "60"), "--expires is for jobs"),
    (("request", "--all", "ping", "--expires", "0"), "must be more than 0 seconds"),
    (("job", "not an id"), "is not a job id"),
])
def test_bad_job_arguments_say_what_is_wrong(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    """Each mistake ends with one plain line and exit code 2, before anything is sent."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("mqtt: {host: 127.0.0.1, port: 9}\npersister: {sqlite_path: " + str(tmp_path / "f.db") + "}\n")
    done = fleetctl(cfg, *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_fleetctl_job_for_an_unknown_job_says_so(tmp_path: Path) -> None:
    """A job id the store holds no request of is one line naming the store, exit code 2."""
    from fleet_store.sqlite import SqliteStore

    SqliteStore(str(tmp_path / "f.db")).close()
    cfg = tmp_path / "config.yaml"
    cfg.write_text("persister: {sqlite_path: " + str(tmp_path / "f.db") + "}\n")
    done = fleetctl(cfg, "job", "0193e5c2a1b17c3d9f8e6a5b4c3d2e00")
    assert done.returncode == 2 and "no request of job 0193e5c2a1b17c3d9f8e6a5b4c3d2e00" in done.stderr


def test_the_fleet_is_the_broker_statuses_with_the_stores_labels_for_offline_agents() -> None:
    """Retained statuses say who is online; a Last Will has no labels, so those come from the store;
    an agent the broker has no status of is not in the fleet; without statuses, the store decides."""
    statuses = {"a": Status("a", True, labels={"role": "web"}), "b": Status("b", False)}
    stored = [Candidate("b", True, {"role": "web"}), Candidate("gone", True, {"role": "web"})]
    fleet = candidates(statuses, stored)
    assert fleet == [Candidate("a", True, {"role": "web"}), Candidate("b", False, {"role": "web"})]
    assert candidates(None, stored) == sorted(stored, key=lambda c: c.agent_id)
    web = JobSpec("ping", selector={"role": "web"})
    assert [c.agent_id for c in select([*fleet, Candidate("c", True, {"role": "db"})], web)] == ["a", "b"]
    assert len(select(fleet, JobSpec("ping"))) == 2
    with pytest.raises(FleetError):
        JobSpec("ping", timeout_s=0)
    with pytest.raises(FleetError):
        JobSpec("Ping")


def test_the_tally_counts_each_agent_once() -> None:
    """targeted = answered + no_answer + waiting, answered = ok + errors, queued apart; exit 0 needs all ok."""
    results = [AgentResult(str(i), s) for i, s in enumerate(["ok"] * 5 + ["error", "no_answer", "waiting", "queued"])]
    tally = Tally.of(results)
    assert tally == Tally(targeted=8, answered=6, ok=5, errors=1, no_answer=1, queued=1, waiting=1)
    assert tally.line() == "targeted 8 · answered 6 (75%) · errors 1 · waiting 1 · no answer 1 · queued 1"
    assert not JobResult("j", "ping", results).all_ok
    assert JobResult("j", "ping", [AgentResult("a", "ok"), AgentResult("b", "queued")]).all_ok
    assert not JobResult("j", "ping", [AgentResult("b", "queued")]).all_ok, "nobody answered"
    shape = JobResult("j", "ping", results).to_dict()
    assert list(shape) == ["job", "type", "targeted", "answered", "ok", "errors", "no_answer", "queued", "waiting",
                           "results"]
    assert set(shape["results"][0]) == {"agent_id", "status", "request_id", "latency_ms", "data", "error"}


def test_a_stored_job_reads_pending_as_waiting_or_queued_and_expiry_as_no_answer() -> None:
    """From the store: a pending request is waiting if its agent is online now, else queued; one the
    persister expired is no_answer; an agent's own `expired` answer is an answered error."""
    def rec(agent: str, state: str, answered: bool = True) -> RequestRecord:
        return RequestRecord(id=f"r-{agent}", agent_id=agent, type="ping", params={}, issued_at="t", expires_at="t",
                             state=state, answered_at="t" if answered else None, latency_ms=3.0 if answered else None,
                             data={} if state == "ok" else None, error=None if state == "ok" else {"code": "x"},
                             expire_at=None, job="j")

    def agent(agent_id: str, online: bool) -> AgentRecord:
        return AgentRecord(agent_id, online, "t", "t", None, None, None, None, None)

    records = [rec("a", "ok"), rec("b", "error"), rec("c", "expired"), rec("d", "expired", answered=False),
               rec("e", "pending", answered=False), rec("f", "pending", answered=False)]
    result = stored_job("j", records, [agent("e", True), agent("f", False)])
    assert result is not None
    assert {r.agent_id: r.status for r in result.results} == {
        "a": "ok", "b": "error", "c": "error", "d": "no_answer", "e": "waiting", "f": "queued"}
    assert stored_job("j", [], []) is None


def test_importing_the_agent_or_the_contract_loads_no_aiomqtt() -> None:
    """The agent stays paho-mqtt and psutil only: aiomqtt is fleetctl's and the dashboard's, for jobs."""
    code = ("import fleet_agent, fleet_agent.agent, fleet_agent.cli, fleet_common, fleet_common.jobs, "
            "fleet_store.jobs, sys; loaded = sorted(m for m in sys.modules if m.startswith('aiomqtt')); "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_job_counts_only_the_first_answer_of_the_agent_it_asked() -> None:
    """An answer is the job's only if it answers a request of the job and comes on the asked agent's
    own topic: another agent's answer under a stolen id, a replay, a malformed answer or status, and
    the controller's answers change nothing; a late answer from a no_answer agent still counts."""
    import aiomqtt

    from fleet_common import Response, load_config
    from fleet_common.jobrun import JobRun

    topics = Topics("fleet")
    run = JobRun(load_config(None, env={}), JobSpec("ping"))
    run.results = {a: AgentResult(a, "waiting") for a in ("a", "b", "c")}
    run.waiting = 3
    run.pending = {"r-a": ("a", 0.0), "r-b": ("b", 0.0), "r-c": ("c", 0.0)}

    def deliver(agent: str, payload: bytes, topic: str | None = None) -> None:
        run._on_message(aiomqtt.Message(topic or topics.response(agent, "ping"), payload, 1, False, 1, None), 0.5)

    deliver("b", Response.ok("r-a", "b", "ping", {}, 1.0).payload())  # b answering a's request
    deliver("a", b'{"id": "r-a", "status": "ok", "data": ')  # malformed
    deliver("a", Response.ok("ctl-1", "a", "ping", {}, 1.0).payload())  # the controller's request
    deliver("a", b"{broken", topic=topics.status("a"))
    assert Tally.of(run.results.values()).waiting == 3 and run.waiting == 3
    deliver("a", Response.ok("r-a", "a", "ping", {}, 1.0).payload())
    deliver("a", Response.fail("r-a", "a", "ping", "timeout", "replayed").payload())  # a replay: ignored
    assert (run.results["a"].status, run.results["a"].latency_ms, run.waiting) == ("ok", 500.0, 2)
    run.results["c"].status, run.waiting = "no_answer", 1  # its wait ran out
    deliver("c", Response.fail("r-c", "c", "ping", "unknown_type", "no ping here").payload())
    assert run.results["c"].status == "error" and run.results["c"].error == {"code": "unknown_type",
                                                                             "message": "no ping here"}
    assert run.waiting == 1 and Tally.of(run.results.values()) == Tally(3, 2, 1, 1, 0, 0, 1)
