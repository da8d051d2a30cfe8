"""The agent's parts alone, without a broker: intake (routing a request), the dispatcher (pool,
watchdog, replacement), the DurablePublisher over the outbox (with a fake link), presence
(birth, will, counters), collector priming, and Agent's wiring of them."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from conftest import wait_for

from fleet_agent import publisher as publisher_module
from fleet_agent.agent import Agent
from fleet_agent.collectors import BadParams, prime_all, register, unregister
from fleet_agent.dispatch import MAX_POOL_REPLACEMENTS, Dispatcher, collect
from fleet_agent.intake import Answer, Dispatch, Drop, Intake, Job
from fleet_agent.outbox import Outbox
from fleet_agent.presence import Counters, Presence, will
from fleet_agent.publisher import Acked, DurablePublisher, Signal
from fleet_common import Request, Response, Topics, iso, new_id
from fleet_common.config import load_config
from fleet_common.messages import MAX_PAYLOAD_BYTES
from fleet_common.topics import MAX_TOPIC_BYTES

AGENT = "web-01"
TOPICS = Topics("fleet")


def request(type_: str = "ping", expires_in_s: float = 60.0, **fields: Any) -> Request:
    now = time.time()
    return Request(id=new_id(), type=type_, issued_at=iso(now - 1), expires_at=iso(now + expires_in_s), **fields)


def props(reply_to: str | None = None, correlation: bytes | None = None) -> Any:
    return SimpleNamespace(ResponseTopic=reply_to, CorrelationData=correlation)


def ping(params: dict[str, Any]) -> dict[str, Any]:
    return {}


# ------------------------------------------------------------------------------------------ intake
@pytest.fixture
def stopping() -> threading.Event:
    return threading.Event()


@pytest.fixture
def intake(stopping: threading.Event) -> Intake:
    return Intake(AGENT, TOPICS, {"ping": ping, "cpu": ping}, stopping)


def test_intake_dispatches_a_request_to_its_collector(intake: Intake) -> None:
    """A well-formed request for a known type becomes a job for that type's collector, answered on res/<type>."""
    r = request("ping")
    routed = intake.route(TOPICS.request(AGENT, "ping"), r.payload(), props(correlation=b"c-1"))
    assert isinstance(routed, Dispatch) and routed.collector is ping
    assert routed.job.req.id == r.id and routed.job.reply_to == TOPICS.response(AGENT, "ping")
    assert routed.job.correlation == b"c-1" and not routed.job.answered


def test_intake_drops_what_is_not_a_request_for_this_agent(intake: Intake) -> None:
    """Another agent's request, a status topic and a topic outside the contract are dropped, with a reason."""
    r = request("ping")
    for topic in (TOPICS.request("other", "ping"), TOPICS.status(AGENT), "fleet/web-01/req/p+g", "elsewhere"):
        routed = intake.route(topic, r.payload())
        assert isinstance(routed, Drop) and routed.topic == topic and routed.why, topic


def test_intake_answers_at_once_what_needs_no_collector(intake: Intake) -> None:
    """Expired -> `expired`, unknown type -> `unknown_type` naming the types this agent answers."""
    expired = request("ping", expires_in_s=-30)
    routed = intake.route(TOPICS.request(AGENT, "ping"), expired.payload())
    assert isinstance(routed, Answer) and routed.response.error == {
        "code": "expired", "message": f"request expired at {expired.expires_at}"}
    unknown = request("gpu")
    routed = intake.route(TOPICS.request(AGENT, "gpu"), unknown.payload())
    assert isinstance(routed, Answer) and routed.response.id == unknown.id
    assert routed.response.error == {"code": "unknown_type", "message": "this agent answers cpu, ping"}


def test_intake_answers_a_malformed_request_only_if_it_has_an_id(intake: Intake) -> None:
    """bad_request with the id from the JSON or, failing that, the CorrelationData; no id: dropped."""
    req_id = new_id()
    routed = intake.route(TOPICS.request(AGENT, "cpu"), json.dumps({"id": req_id, "type": "ping"}).encode())
    assert isinstance(routed, Answer) and routed.response.id == req_id and routed.response.type == "cpu"
    assert (routed.response.error or {})["code"] == "bad_request"
    routed = intake.route(TOPICS.request(AGENT, "cpu"), b"{broken", props(correlation=req_id.encode()))
    assert isinstance(routed, Answer) and routed.response.id == req_id and routed.job.correlation == req_id.encode()
    assert isinstance(intake.route(TOPICS.request(AGENT, "cpu"), b"\xff garbage"), Drop)
    assert isinstance(intake.route(TOPICS.request(AGENT, "cpu"), b"{", props(correlation=b"\xff")), Drop)


def test_intake_drops_requests_while_stopping_but_still_answers_malformed_ones(
        intake: Intake, stopping: threading.Event) -> None:
    """Once stopping no worker takes a job, so well-formed requests are dropped; a bad_request costs nothing."""
    stopping.set()
    assert isinstance(intake.route(TOPICS.request(AGENT, "ping"), request().payload()), Drop)
    req_id = new_id()
    assert isinstance(intake.route(TOPICS.request(AGENT, "ping"), b"{", props(correlation=req_id.encode())), Answer)


@pytest.mark.parametrize("reply_to, used", [
    (TOPICS.response_base(AGENT) + "ping/inbox-1", True),
    (TOPICS.response_base(AGENT), False),  # the base alone is no topic of its own
    (TOPICS.response_base("other") + "ping", False),
    ("elsewhere/inbox", False),
    (TOPICS.response_base(AGENT) + "ping/+", False),
    (TOPICS.response_base(AGENT) + "ping/#", False),
    (TOPICS.response_base(AGENT) + "ping\x00x", False),
    (TOPICS.response_base(AGENT) + "x" * MAX_TOPIC_BYTES, False),
    (None, False),
])
def test_intake_uses_a_response_topic_only_under_the_agents_own_res(intake: Intake, reply_to: str | None,
                                                                    used: bool) -> None:
    """The design's rule: a ResponseTopic under fleet/<id>/res/, with no wildcard or NUL and short enough."""
    routed = intake.route(TOPICS.request(AGENT, "ping"), request().payload(), props(reply_to))
    assert isinstance(routed, Dispatch)
    assert routed.job.reply_to == (reply_to if used else TOPICS.response(AGENT, "ping"))


# ------------------------------------------------------------------------------------------ dispatch
def job(type_: str = "ping", **params: Any) -> Job:
    return Job(Request(id=new_id(), type=type_, params=params), "t", None)


def test_collect_makes_every_outcome_an_answer() -> None:
    """A reading is `ok` with JSON-safe data; BadParams is `bad_request`; a non-object, a result
    breaking the contract or an exception is `collector_failed` with what went wrong."""

    def bad_params(params: dict[str, Any]) -> dict[str, Any]:
        raise BadParams("limit must be 1-1000")

    def boom(params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("sensor on fire")

    ok = collect(job(limit=3), lambda p: {"got": p, "t": (1, float("nan"))}, AGENT)
    assert ok.status == "ok" and ok.data == {"got": {"limit": 3}, "t": [1, None]} and ok.agent_id == AGENT
    cases: list[tuple[Callable[[dict[str, Any]], Any], str, str]] = [
        (bad_params, "bad_request", "limit must be 1-1000"),
        (boom, "collector_failed", "sensor on fire"),
        (lambda p: [1, 2], "collector_failed", "collector returned list, not an object"),
        (lambda p: {"$where": 1}, "collector_failed", "result breaks the contract"),
        (lambda p: 1 // 0 and {}, "collector_failed", "by zero"),
    ]
    for collector, code, message in cases:
        answer = collect(job(), collector, AGENT)
        assert answer.status == "error" and (answer.error or {})["code"] == code, answer
        assert message in (answer.error or {})["message"] and (answer.duration_ms or 0.0) >= 0.0


class Answers:
    """What the agent's _answer does with a dispatcher's results: the first answer per job wins."""

    def __init__(self) -> None:
        self.got: list[Response] = []
        self.drops: list[str] = []
        self.cond = threading.Condition()

    def answer(self, job: Job, response: Response) -> bool:
        if not job.claim():
            return False
        with self.cond:
            self.got.append(response)
            self.cond.notify_all()
        return True

    def drop(self, topic: str, why: str) -> None:
        self.drops.append(why)

    def wait(self, n: int, timeout_s: float = 5.0) -> list[Response]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout_s), f"{len(self.got)} of {n} answers"
            return list(self.got)


@pytest.fixture
def answers() -> Answers:
    return Answers()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # no worker outlives its test


def test_dispatcher_answers_from_a_worker_and_times_out_a_slow_collector(answers: Answers,
                                                                       release: threading.Event) -> None:
    """A fast collector's answer comes from a worker; a slow one is answered `timeout` once, and its
    late result is discarded; busy counts the collector until it returns."""
    dispatcher = Dispatcher(AGENT, 2, 0.2, answers.answer, answers.drop)
    dispatcher.start()
    try:
        slow, fast = job(), job()
        dispatcher.submit(slow, lambda p: release.wait(5) and {"late": True})
        dispatcher.submit(fast, ping)
        got = answers.wait(2)
        assert [r.id for r in got] == [fast.req.id, slow.req.id]
        assert got[1].error == {"code": "timeout", "message": "collector took longer than 0.2 s"}
        assert (got[1].duration_ms or 0.0) >= 200 and dispatcher.busy == 1 and dispatcher.stuck() == 1
        release.set()
        wait_for(lambda: dispatcher.busy == 0, 5, 0.01, "the slow collector to return")
        assert len(answers.got) == 2
    finally:
        dispatcher.stop()


def test_dispatcher_replaces_a_pool_whose_workers_are_all_stuck(answers: Answers, release: threading.Event) -> None:
    """With every worker hung past its timeout, the next job gets a new pool (at most
    MAX_POOL_REPLACEMENTS times), so the agent keeps answering."""
    dispatcher = Dispatcher(AGENT, 1, 0.1, answers.answer, answers.drop)
    dispatcher.start()

    def hang(params: dict[str, Any]) -> dict[str, Any]:
        release.wait(5)
        return {}

    try:
        dispatcher.submit(job(), hang)
        answers.wait(1)  # its timeout
        dispatcher.submit(job(), ping)
        got = answers.wait(2)
        assert got[-1].status == "ok" and dispatcher.replaced == 1
        n = 2
        while dispatcher.replaced < MAX_POOL_REPLACEMENTS:  # each further hung worker costs a pool
            dispatcher.submit(job(), hang)
            n += 1
            answers.wait(n)
        dispatcher.submit(job(), ping)  # no pool left to replace the hung one: this one times out
        got = answers.wait(n + 1)
        assert dispatcher.replaced == MAX_POOL_REPLACEMENTS and (got[-1].error or {})["code"] == "timeout"
    finally:
        release.set()
        dispatcher.stop()


def test_dispatcher_drops_a_job_submitted_after_stop(answers: Answers) -> None:
    """After stop() a job is dropped (and claimed, so no timeout answers it either); before start() it is an error."""
    dispatcher = Dispatcher(AGENT, 1, 0.1, answers.answer, answers.drop)
    with pytest.raises(RuntimeError, match="not started"):
        dispatcher.submit(job(), ping)
    dispatcher.start()
    dispatcher.stop()
    late = job()
    dispatcher.submit(late, ping)
    assert late.answered and len(answers.drops) == 1 and answers.got == []


# ------------------------------------------------------------------------------------------ publisher
class FakeLink:
    """The part of fleet_common's Link the publisher and presence use; records what is published."""

    def __init__(self, connected: bool = True, fail: bool = False) -> None:
        self.connected = threading.Event()
        if connected:
            self.connected.set()
        self.fail, self.waits = fail, 0
        self.sent: list[tuple[int, str, bytes, Any, bool]] = []  # mid, topic, payload, properties, retain
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Any = None) -> Any:
        if self.fail:
            raise ValueError("payload too large")
        with self._lock:
            mid = len(self.sent) + 1
            self.sent.append((mid, topic, payload, properties, retain))
        return SimpleNamespace(mid=mid, wait_for_publish=lambda timeout: None)

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        self.waits += 1
        return self.connected.wait(timeout_s)

    def topics(self) -> list[str]:
        with self._lock:
            return [s[1] for s in self.sent]


@pytest.fixture
def fast_courier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher_module, "COURIER_CHECK_S", 0.1)
    monkeypatch.setattr(publisher_module, "ACK_LINGER_S", 0.05)


def started(box: Outbox, link: FakeLink, on_tick: Callable[[], None] = lambda: None) -> DurablePublisher:
    pub = DurablePublisher(box, link, threading.Event(), on_tick)
    pub.start()
    return pub


def test_publisher_keeps_an_answer_until_its_puback(tmp_path: Path, fast_courier: None) -> None:
    """send() stores the answer and publishes it with its CorrelationData; it leaves the outbox
    only when its mid is acknowledged, and an unknown mid is harmless."""
    box, link = Outbox(str(tmp_path / "o.db"), 100), FakeLink()
    pub = started(box, link)
    try:
        pub.send("fleet/web-01/res/ping", b"answer", b"corr")
        mid, topic, payload, properties, retain = link.sent[0]
        assert (topic, payload, retain) == ("fleet/web-01/res/ping", b"answer", False)
        assert properties.CorrelationData == b"corr"
        assert box.counts()["queued"] == 1 and pub.unacked == 1
        pub.acked(999)
        pub.acked(mid)
        wait_for(lambda: box.counts()["queued"] == 0, 5, 0.01, "the acknowledged answer to leave the outbox")
        assert pub.unacked == 0
    finally:
        pub.stop()


def test_publisher_holds_answers_while_offline_and_replays_them_in_order(tmp_path: Path, fast_courier: None) -> None:
    """Offline, answers wait in the outbox, not in paho; replay() after connecting sends each once, in order."""
    box, link = Outbox(str(tmp_path / "o.db"), 100), FakeLink(connected=False)
    pub = started(box, link)
    try:
        for i in range(5):
            pub.send(f"t/{i}", b"x", None)
        assert link.sent == [] and box.counts()["queued"] == 5
        link.connected.set()
        pub.replay()
        wait_for(lambda: len(link.sent) == 5, 5, 0.01, "the replay")
        pub.replay()  # paho holds them now: not handed over twice
        wait_for(lambda: link.waits >= 2, 5, 0.01, "the second replay")
        pub.stop()  # returns once the courier has finished that replay
        assert link.topics() == [f"t/{i}" for i in range(5)]
    finally:
        pub.stop()


def test_publisher_replays_what_a_previous_run_left_in_the_outbox(tmp_path: Path, fast_courier: None) -> None:
    """Answers stored by an agent that was killed are sent after the next start's first connect."""
    path = str(tmp_path / "o.db")
    before = Outbox(path, 100)
    for i in range(3):
        before.put(f"t/{i}", f"answer {i}".encode(), None)
    before.close()
    box, link = Outbox(path, 100), FakeLink()
    pub = started(box, link)
    try:
        pub.replay()
        wait_for(lambda: len(link.sent) == 3, 5, 0.01, "the replay")
        assert [(s[1], s[2]) for s in link.sent] == [(f"t/{i}", f"answer {i}".encode()) for i in range(3)]
    finally:
        pub.stop()


def test_publisher_finds_entries_never_handed_to_paho_and_ticks(tmp_path: Path, fast_courier: None) -> None:
    """The courier's periodic check sends entries paho does not hold (without a replay) and calls on_tick."""
    box, link = Outbox(str(tmp_path / "o.db"), 100), FakeLink()
    ticks = threading.Semaphore(0)
    pub = started(box, link, ticks.release)
    try:
        box.put("t/orphan", b"x", None)  # stored, never handed over
        wait_for(lambda: link.topics() == ["t/orphan"], 5, 0.01, "the periodic check to send it")
        assert ticks.acquire(timeout=5)
    finally:
        pub.stop()


def test_publisher_drops_an_answer_that_can_never_be_published(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """An answer paho refuses outright (e.g. too large) leaves the outbox with an error, not retried forever."""
    box, link = Outbox(str(tmp_path / "o.db"), 100), FakeLink(fail=True)
    pub = DurablePublisher(box, link, threading.Event())
    with caplog.at_level(logging.ERROR, logger="fleet.agent"):
        pub.send("t/big", b"x", None)
    assert box.counts()["queued"] == 0 and pub.unacked == 0 and "cannot be published" in caplog.text
    pub.stop()


def test_publisher_queue_is_typed() -> None:
    """The courier's queue holds acknowledgements and signals, not numbers with reserved values."""
    pub = DurablePublisher(Outbox(":memory:", 10), FakeLink(), threading.Event())
    pub.acked(1)
    pub.replay()
    assert pub._take() == [Acked(1), Signal.REPLAY]
    pub.stop()


def test_publisher_stop_ends_the_courier_and_closes_the_outbox(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "o.db"), 10)
    pub = started(box, FakeLink())
    pub.stop()
    assert pub._courier is not None and not pub._courier.is_alive()
    with pytest.raises(Exception, match="closed"):
        box.entries()


# ------------------------------------------------------------------------------------------ presence
def test_will_is_the_offline_status() -> None:
    """The Last Will is the retained offline message on the agent's status topic: v, agent_id, online, ts."""
    topic, payload = will(TOPICS, AGENT)
    body = json.loads(payload)
    assert topic == TOPICS.status(AGENT) and set(body) == {"v", "agent_id", "online", "ts"}
    assert body["agent_id"] == AGENT and body["online"] is False


def test_birth_carries_host_types_counters_and_outbox() -> None:
    """announce() publishes a retained birth with the types, host details and the agent's own counters."""
    link, box = FakeLink(), Outbox(":memory:", 10)
    presence = Presence(AGENT, TOPICS, link, box, lambda: ["cpu", "ping"])
    presence.counters.count("received")
    presence.announce()
    (_, topic, payload, _, retain), = link.sent
    body = json.loads(payload)
    assert topic == TOPICS.status(AGENT) and retain
    assert body["online"] is True and body["types"] == ["cpu", "ping"] and body["agent_version"] == "0.1.0"
    assert body["hostname"] and body["platform"]
    assert body["outbox"] == {"queued": 0, "dropped": 0} and body["counters"]["received"] == 1
    box.close()


def test_counters_count_answers_by_outcome() -> None:
    counters = Counters()
    for code in ("ok", "ok", "timeout", "bad_request"):
        counters.answered(code)
    counters.count("dropped")
    assert counters.snapshot() == {"received": 0, "answered": 4, "ok": 2, "errors": 2, "timeouts": 1, "dropped": 1}


def test_a_changed_drop_count_is_announced_once(tmp_path: Path) -> None:
    """report_drops() publishes a fresh birth when the outbox has dropped more since the last one, and only then."""
    link, box = FakeLink(), Outbox(str(tmp_path / "o.db"), 1)
    presence = Presence(AGENT, TOPICS, link, box, lambda: ["ping"])
    presence.report_drops()
    assert link.sent == []
    box.put("t", b"1", None)
    box.put("t", b"2", None)  # drops the first
    presence.report_drops()
    presence.report_drops()
    assert len(link.sent) == 1 and json.loads(link.sent[0][2])["outbox"] == {"queued": 1, "dropped": 1}
    box.close()


def test_collector_health_is_logged_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    """A type's collector failing, failing again and working again is two log lines; bad requests say nothing."""
    presence = Presence(AGENT, TOPICS, FakeLink(), Outbox(":memory:", 10), lambda: [])
    failed = Response.fail("r1", AGENT, "disk", "collector_failed", "no such mount")
    with caplog.at_level(logging.INFO, logger="fleet.agent"):
        for response in (failed, failed, Response.fail("r2", AGENT, "disk", "bad_request", "x"),
                         Response.ok("r3", AGENT, "disk", {}, 1.0)):
            presence.answered(response)
    assert [r.getMessage() for r in caplog.records] == ["collector disk: collector_failed: no such mount",
                                                        "collector disk works again"]


# ------------------------------------------------------------------------------------------ priming and wiring
def test_prime_all_primes_only_registered_collectors_and_survives_failures() -> None:
    """A collector replaced by another keeps its primer unused; a failing primer is not fatal."""
    primed: list[str] = []

    def failing() -> None:
        raise OSError("not now")

    register("prime_test_a", prime=lambda: primed.append("a"))(ping)
    register("prime_test_b", prime=lambda: primed.append("b"))(ping)
    register("prime_test_c", prime=failing)(ping)
    try:
        from fleet_agent.collectors import REGISTRY
        prime_all({"prime_test_a": REGISTRY["prime_test_a"], "prime_test_b": lambda p: {},
                   "prime_test_c": REGISTRY["prime_test_c"]})
        assert primed == ["a"]
    finally:
        for name in ("prime_test_a", "prime_test_b", "prime_test_c"):
            unregister(name)


def test_agent_wires_intake_dispatcher_publisher_and_presence(tmp_path: Path) -> None:
    """Without a broker: a request handed to Agent.handle is answered into the outbox (the link is
    down) on its reply topic, and counted; an answer over the message limit becomes an error
    answer saying so; an id-less request is dropped and counted."""
    cfg = load_config(None, env={"FLEET_AGENT_OUTBOX_PATH": str(tmp_path / "outbox.db")})
    agent = Agent(cfg, agent_id=AGENT, collectors={"echo": lambda p: {"params": p},
                                                   "huge": lambda p: {"x": "a" * MAX_PAYLOAD_BYTES}})
    agent.dispatcher.start()
    try:
        r, huge = Request(id=new_id(), type="echo", params={"a": 1}), Request(id=new_id(), type="huge")
        agent.handle(agent.topics.request(AGENT, "echo"), r.payload())
        agent.handle(agent.topics.request(AGENT, "echo"), b"garbage")
        wait_for(lambda: agent.outbox.counts()["queued"] == 1, 5, 0.01, "the answer in the outbox")
        agent.handle(agent.topics.request(AGENT, "huge"), huge.payload())
        wait_for(lambda: agent.outbox.counts()["queued"] == 2, 5, 0.01, "the second answer in the outbox")
        (_, topic, payload, correlation), (_, _, too_big, _) = agent.outbox.entries()
        body = json.loads(payload)
        assert topic == agent.topics.response(AGENT, "echo") and correlation is None
        assert body["id"] == r.id and body["status"] == "ok" and body["data"] == {"params": {"a": 1}}
        error = json.loads(too_big)["error"]
        assert error["code"] == "collector_failed" and "message limit" in error["message"]
        assert agent.stats == {"received": 3, "answered": 2, "ok": 1, "errors": 1, "timeouts": 0, "dropped": 1}
        assert agent.health()["outbox"] == {"queued": 2, "dropped": 0}
    finally:
        agent.dispatcher.stop()
        agent.outbox.close()
