"""The agent against a real Mosquitto: birth and goodbye status, request/response over MQTT 5,
error codes, response-topic rules, collector timeouts and its memory footprint."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import psutil
import pytest
from conftest import Procs, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from fleet_agent.agent import Agent
from fleet_agent.collectors import BUILTIN, register, unregister
from fleet_agent.publisher import ACK_LINGER_S
from fleet_common import Request, Topics, iso, new_id
from fleet_common.config import load_config
from fleet_common.link import publish_properties


class Msg:
    def __init__(self, m: mqtt.MQTTMessage) -> None:
        self.topic, self.retain = m.topic, bool(m.retain)
        try:
            self.payload: dict[str, Any] = json.loads(m.payload)
        except ValueError:  # our own garbage requests, seen on prefix/#
            self.payload = {}
        self.correlation: bytes | None = getattr(m.properties, "CorrelationData", None)


class Client:
    """A plain paho MQTT 5 client that records every message it receives."""

    def __init__(self, port: int, *topics: str) -> None:
        self.messages: list[Msg] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-" + uuid.uuid4().hex[:8],
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if topics:
            self.c.subscribe([(t, 1) for t in topics])
            assert self._subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Msg(m))

    def find(self, pred: Callable[[Msg], bool]) -> list[Msg]:
        with self._lock:
            return [m for m in self.messages if pred(m)]

    def wait(self, pred: Callable[[Msg], bool], what: str, timeout_s: float = 20.0) -> Msg:
        return wait_for(lambda: next(iter(self.find(pred)), None), timeout_s, 0.02, what)  # type: ignore[no-any-return]

    def reply(self, req_id: str, timeout_s: float = 20.0) -> Msg:
        return self.wait(lambda m: "/req/" not in m.topic and m.payload.get("id") == req_id,
                         f"a response to {req_id}", timeout_s)

    def request(self, topic: str, payload: bytes, response_topic: str | None = None,
                correlation: bytes | None = None) -> None:
        props = publish_properties(response_topic, correlation, 60)
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def agent_id(prefix: str) -> str:
    return "host-" + prefix


@pytest.fixture
def topics(prefix: str) -> Topics:
    return Topics(prefix)


@pytest.fixture
def client(broker: Any, prefix: str) -> Iterator[Client]:
    c = Client(broker.port, f"{prefix}/#")
    yield c
    c.close()


@pytest.fixture
def running_agent(broker: Any, procs: Procs, write_config: Callable[..., Path], client: Client, agent_id: str,
                  topics: Topics) -> psutil.Process:
    """A `fleet-agent` process, up and subscribed (its birth status has been seen)."""
    cfg = write_config("agent", agent={"id": agent_id})
    proc = procs.start("agent", "fleet-agent", "--config", str(cfg))
    client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is True, "birth status")
    return psutil.Process(proc.pid)


def req(type_: str, **fields: Any) -> Request:
    return Request(id=new_id(), type=type_, issued_at=iso(time.time()),
                   expires_at=iso(time.time() + 60), **fields)


def test_birth_status_is_retained_and_lists_types(running_agent: psutil.Process, broker: Any,
                                                  agent_id: str, topics: Topics) -> None:
    """A client arriving later gets the retained birth: online, host details and the sorted built-in types."""
    late = Client(broker.port, topics.status(agent_id))
    try:
        birth = late.wait(lambda m: True, "retained status").payload
        assert late.messages[0].retain
    finally:
        late.close()
    assert birth["online"] is True and birth["agent_id"] == agent_id and birth["v"] == 1
    assert birth["types"] == sorted(BUILTIN)
    assert birth["hostname"] and birth["platform"] and birth["agent_version"] == "0.1.0"


def test_response_topic_and_correlation_data_are_honoured(running_agent: psutil.Process, client: Client,
                                                          agent_id: str, topics: Topics) -> None:
    """A request's ResponseTopic under the agent's res/ is used and its CorrelationData echoed."""
    r = req("cpu")
    reply_to = topics.response_base(agent_id) + "cpu/inbox-1"
    client.request(topics.request(agent_id, "cpu"), r.payload(), reply_to, r.id.encode())
    got = client.reply(r.id)
    assert got.topic == reply_to and got.correlation == r.id.encode()
    body = got.payload
    assert body["status"] == "ok" and body["error"] is None and body["agent_id"] == agent_id
    assert body["type"] == "cpu" and len(body["data"]["per_cpu"]) == psutil.cpu_count()
    assert body["duration_ms"] >= 0 and body["collected_at"].endswith("Z")


def test_foreign_response_topic_is_not_used(running_agent: psutil.Process, client: Client, broker: Any,
                                            agent_id: str, topics: Topics, prefix: str) -> None:
    """ResponseTopics outside the agent's own res/ (another agent's, another tree) fall back to res/<type>."""
    outside = Client(broker.port, "elsewhere/#")
    try:
        ids = []
        for reply_to in ("elsewhere/inbox", topics.response_base("other-agent") + "ping",
                         f"{prefix}/{agent_id}/res", f"{prefix}/{agent_id}/resx/ping"):
            r = req("ping")
            ids.append(r.id)
            client.request(topics.request(agent_id, "ping"), r.payload(), reply_to, r.id.encode())
        for req_id in ids:
            got = client.reply(req_id)
            assert got.topic == topics.response(agent_id, "ping"), got.topic
            assert got.payload["status"] == "ok" and got.payload["data"] == {}
            assert got.correlation == req_id.encode()
        assert outside.messages == []
    finally:
        outside.close()


def test_error_codes_and_the_agent_survives_bad_requests(running_agent: psutil.Process, client: Client,
                                                         agent_id: str, topics: Topics) -> None:
    """expired -> `expired`, unknown type -> `unknown_type`, bad params or payload -> `bad_request`;
    garbage without an id gets no answer; the agent keeps answering afterwards."""
    expired = Request(id=new_id(), type="cpu", issued_at=iso(time.time() - 120), expires_at=iso(time.time() - 60))
    unknown = req("gpu")
    bad_limit = req("processes", params={"limit": 0})
    bad_param = req("memory", params={"nope": True})
    mismatch_id = new_id()
    cases = [
        (topics.request(agent_id, "cpu"), expired.payload(), expired.id, "expired"),
        (topics.request(agent_id, "gpu"), unknown.payload(), unknown.id, "unknown_type"),
        (topics.request(agent_id, "processes"), bad_limit.payload(), bad_limit.id, "bad_request"),
        (topics.request(agent_id, "memory"), bad_param.payload(), bad_param.id, "bad_request"),
        (topics.request(agent_id, "disk"), json.dumps({"id": mismatch_id, "type": "cpu"}).encode(), mismatch_id,
         "bad_request"),
    ]
    client.request(topics.request(agent_id, "cpu"), b"\xff not json")  # no id anywhere: dropped
    for topic, payload, _, _ in cases:
        client.request(topic, payload)
    for _, _, req_id, code in cases:
        body = client.reply(req_id).payload
        assert body["status"] == "error" and body["data"] is None, body
        assert body["error"]["code"] == code, body
        assert body["error"]["message"]
    # a malformed payload whose id survives only in CorrelationData is still answered
    corr_id = new_id()
    client.request(topics.request(agent_id, "cpu"), b"{broken", correlation=corr_id.encode())
    assert client.reply(corr_id).payload["error"]["code"] == "bad_request"
    ok = req("memory")
    client.request(topics.request(agent_id, "memory"), ok.payload())
    assert client.reply(ok.id).payload["status"] == "ok"
    assert running_agent.is_running()
    answers = client.find(lambda m: m.topic.startswith(topics.response_base(agent_id)))
    assert len(answers) == len(cases) + 2  # nothing for the id-less garbage


def test_every_type_answers_and_idle_rss_is_small(running_agent: psutil.Process, client: Client,
                                                  agent_id: str, topics: Topics) -> None:
    """Each built-in type answers ok once; afterwards the agent process stays small in memory."""
    sent = {}
    threads_before = running_agent.num_threads()
    for type_ in BUILTIN:
        r = req(type_)
        sent[type_] = r.id
        client.request(topics.request(agent_id, type_), r.payload())
    for type_, req_id in sent.items():
        got = client.reply(req_id)
        assert got.payload["status"] == "ok" and got.payload["type"] == type_, got.payload
        assert got.topic == topics.response(agent_id, type_)
    # idle: timer threads gone, only the (at most 2) pooled workers added
    wait_for(lambda: running_agent.num_threads() <= threads_before + 2, 10, 0.05, "timer threads to end")
    mem = running_agent.memory_full_info()
    rss_mb = mem.rss / 2**20
    print(f"\nagent idle RSS after answering every type: {rss_mb:.1f} MiB (USS {mem.uss / 2**20:.1f} MiB)")
    assert rss_mb < 35, f"agent RSS {rss_mb:.1f} MiB"  # aim: < 30 MB


def test_sigterm_publishes_offline_status_and_exits_zero(running_agent: psutil.Process, procs: Procs,
                                                         client: Client, agent_id: str, topics: Topics) -> None:
    """SIGTERM: the retained status becomes online=false and the process exits 0 within a few seconds."""
    started = time.monotonic()
    assert procs.stop("agent", signal.SIGTERM, timeout_s=10) == 0
    assert time.monotonic() - started < 5
    bye = client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is False,
                      "offline status")
    assert set(bye.payload) == {"v", "agent_id", "online", "ts"}
    assert "stopped" in procs.log("agent") and "Traceback" not in procs.log("agent")


def test_last_will_marks_a_killed_agent_offline(running_agent: psutil.Process, procs: Procs,
                                                client: Client, agent_id: str, topics: Topics) -> None:
    """An agent killed without goodbye is reported offline by the broker's Last Will."""
    procs.stop("agent", signal.SIGKILL)
    client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is False, "Last Will")


def test_bad_config_is_one_line_and_exit_2(procs: Procs, tmp_path: Path) -> None:
    """A config error prints one line naming the key and exits 2, without a traceback."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("agent: {workers: many}\n")
    proc = procs.start("bad", "fleet-agent", "--config", str(cfg))
    assert proc.wait(20) == 2
    out = procs.log("bad").strip()
    assert "agent.workers" in out and "Traceback" not in out and len(out.splitlines()) == 1


def test_collector_timeout_and_failure_in_process(broker: Any, write_config: Callable[..., Path],
                                                  client: Client, agent_id: str, topics: Topics) -> None:
    """A collector slower than collector_timeout_s is answered `timeout` (once); one that raises
    `collector_failed` with its message; the agent keeps serving other requests meanwhile."""
    release = threading.Event()

    @register("slow_test")
    def slow(params: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"late": True}

    @register("boom_test")
    def boom(params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("sensor on fire")

    cfg = load_config(str(write_config("agent", agent={"id": agent_id, "collector_timeout_s": 0.3})))
    agent = Agent(cfg).start()
    try:
        assert agent.wait_connected(10)
        client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is True, "birth")
        assert {"slow_test", "boom_test"} <= set(client.find(lambda m: m.topic.endswith("status"))[0]
                                                 .payload["types"])
        slow_req, boom_req, ping_req = req("slow_test"), req("boom_test"), req("ping")
        for r in (slow_req, boom_req, ping_req):
            client.request(topics.request(agent_id, r.type), r.payload())
        timed_out = client.reply(slow_req.id).payload
        assert timed_out["error"]["code"] == "timeout" and timed_out["duration_ms"] >= 300
        failed = client.reply(boom_req.id).payload
        assert failed["error"] == {"code": "collector_failed", "message": "sensor on fire"}
        assert client.reply(ping_req.id).payload["status"] == "ok"
        release.set()
        wait_for(lambda: agent.busy == 0, 10, what="the slow collector to finish")
        after = req("ping")
        client.request(topics.request(agent_id, "ping"), after.payload())
        client.reply(after.id)
        answers = client.find(lambda m: "/res/" in m.topic and m.payload.get("id") == slow_req.id)
        assert len(answers) == 1  # the late result was dropped
        assert agent.stats["timeouts"] == 1
    finally:
        release.set()
        agent.stop()
        unregister("slow_test")
        unregister("boom_test")
    client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is False, "offline")


def test_one_watchdog_times_out_exactly_the_unanswered_jobs() -> None:
    """The collector watchdog: jobs answered in time are left alone, the rest get on_timeout once,
    in the order they were watched, from one thread however many requests there are."""
    from fleet_agent.dispatch import Watchdog as _Watchdog
    from fleet_agent.intake import Job as _Job
    from fleet_common import Request

    timed_out: list[str] = []
    threads = set()

    def on_timeout(job: _Job) -> None:
        threads.add(threading.get_ident())
        timed_out.append(job.req.id)

    dog = _Watchdog(0.3, on_timeout)
    dog.start()
    try:
        jobs = [_Job(Request(id=f"r{i:02d}", type="ping"), "t", None) for i in range(50)]
        for i, job in enumerate(jobs):
            dog.watch(job)
            if i % 2 == 0:
                assert job.claim()  # answered in time
        wait_for(lambda: len(timed_out) >= 25, 5, 0.02, what="the unanswered jobs timed out")
        time.sleep(0.4)
        assert timed_out == [f"r{i:02d}" for i in range(1, 50, 2)]
        assert len(threads) == 1
    finally:
        dog.stop()


def test_the_watchdog_wakes_per_timeout_not_per_request() -> None:
    """100 requests answered at once over a second wake the watchdog a handful of times: each
    wake-up costs the agent two context switches, and it used to wake once per request."""
    from fleet_agent.dispatch import Watchdog as _Watchdog
    from fleet_agent.intake import Job as _Job
    from fleet_common import Request

    timed_out: list[_Job] = []
    dog = _Watchdog(0.5, timed_out.append)
    dog.start()
    started = time.monotonic()
    try:
        for i in range(100):
            job = _Job(Request(id=f"r{i:03d}", type="ping"), "t", None)
            dog.watch(job)
            assert job.claim()
            time.sleep(0.01)
        late = _Job(Request(id="late", type="ping"), "t", None)
        dog.watch(late)
        wait_for(lambda: len(timed_out) == 1, 3, 0.02, what="the unanswered job to time out")
        # about twice per timeout for as long as it ran (a slow machine stretches the run, not the
        # rule); once per request would be over 100
        bound = 2 * (time.monotonic() - started) / 0.5 + 4
        assert timed_out == [late] and dog.wakeups <= bound, (dog.wakeups, bound)
    finally:
        dog.stop()


def test_acknowledged_answers_leave_the_outbox_in_batches(broker: Any, write_config: Callable[..., Path],
                                                          client: Client, agent_id: str, topics: Topics) -> None:
    """30 answers in 0.6 s leave the outbox in a few deletes, not one per PUBACK (each was a
    wake-up of the courier thread and a SQLite transaction), and all of them do leave it."""
    cfg = load_config(str(write_config("agent", agent={"id": agent_id})))
    agent = Agent(cfg).start()
    deletes: list[int] = []
    real_delete = agent.outbox.delete

    def counted(seqs: list[int]) -> None:
        deletes.append(len(seqs))
        real_delete(seqs)

    agent.outbox.delete = counted  # type: ignore[method-assign]
    try:
        assert agent.wait_connected(10)
        client.wait(lambda m: m.topic == topics.status(agent_id) and m.payload["online"] is True, "birth")
        sent = [req("ping") for _ in range(30)]
        started = time.monotonic()
        for r in sent:
            client.request(topics.request(agent_id, "ping"), r.payload())
            time.sleep(0.02)
        for r in sent:
            assert client.reply(r.id).payload["status"] == "ok"
        wait_for(lambda: agent.outbox.counts()["queued"] == 0, 5, 0.05, what="the outbox to empty")
        # one delete per ACK_LINGER_S of the run at most (a slow machine stretches the run, not the
        # rule); one per PUBACK would be 30
        bound = (time.monotonic() - started) / ACK_LINGER_S + 2
        assert sum(deletes) == 30 and len(deletes) <= bound, (deletes, bound)
    finally:
        agent.stop()
