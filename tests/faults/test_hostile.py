"""Hostile input against the real stack: a real Mosquitto, a real fleet-persister with its parse
worker and a real SQLite file, and a real fleet-agent. Each test sends what an attacker with one
agent's credentials (or anyone on the anonymous development broker) can send, and proves one
property: the message is at worst a dead letter with its reason, nothing false is stored as an
answer, and the persister is alive and still storing (a good message sent after the attack is
stored). The last test checks that all of it left the persister's memory bounded.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from conftest import Procs, wait_for
from faultlib import new_prefix, start_broker, wait_persister_ready, write_config
from helpers import loads, rows
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet_common import Request, Response, Status, Topics, iso, new_id
from fleet_common.config import load_config
from fleet_common.datatypes import example
from fleet_common.link import publish_properties
from fleet_dashboard.app import create_app
from fleet_store.sqlite import SqliteStore
from fleetctl.broker import EmbeddedBroker

pytestmark = [pytest.mark.slow]

A, B = "host-a", "host-b"  # host-a runs a real agent; host-b is the attacker's identity
RSS_GROWTH_LIMIT_MB = 25


class Stack:
    """The stack all tests here share, and a client that publishes whatever it is told to."""

    def __init__(self, broker: EmbeddedBroker, procs: Procs, tmp: Path, prefix: str, config: Path) -> None:
        self.broker, self.procs, self.tmp = broker, procs, tmp
        self.topics, self.db, self.config = Topics(prefix), tmp / "fleet.db", config
        self.answers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.connect("127.0.0.1", broker.port)
        # noLocal: what this client publishes itself (the forged answers) is not taken for an agent's
        c.subscribe(self.topics.all_responses(), options=SubscribeOptions(qos=1, noLocal=True))
        c.loop_start()
        self.client = c

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            with self._lock:
                self.answers[body["id"]] = body

    def send(self, topic: str, payload: Any, retain: bool = False, correlation: bytes | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = publish_properties(correlation=correlation) if correlation is not None else None
        self.client.publish(topic, raw, qos=1, retain=retain, properties=props).wait_for_publish(10)

    def ask(self, agent: str, type_: str, **fields: Any) -> Request:
        """A request as the controller sends it (a fresh id, issued now)."""
        now = time.time()
        req = Request(**{"id": new_id(), "type": type_, "issued_at": iso(now), "expires_at": iso(now + 60),
                         **fields})
        self.send(self.topics.request(agent, type_), req.payload())
        return req

    def answer(self, agent: str, type_: str, req_id: str, data: Any = None, **fields: Any) -> None:
        """An answer published on `agent`'s response topic (what that agent's credentials allow)."""
        body = Response.ok(req_id, agent, type_, example(type_) if data is None else data, 1.0).to_dict()
        self.send(self.topics.response(agent, type_), {**body, **fields})

    def settle(self) -> None:
        """Everything sent so far is committed (stored or rejected) once a marker sent after it is:
        one publisher, one persister, so the broker and the persister keep the order."""
        marker = self.ask(B, "ping")
        self.answer(B, "ping", marker.id)
        wait_for(lambda: self.record(marker.id).get("state") == "ok", 30, 0.05, what="the marker stored")

    def record(self, req_id: str) -> dict[str, Any]:
        found = rows(self.db, "SELECT * FROM requests WHERE id = ?", req_id)
        return found[0] if found else {}

    def dead(self, like: str) -> list[dict[str, Any]]:
        """Dead letters whose payload contains `like` (an id, usually)."""
        return rows(self.db, "SELECT * FROM rejected WHERE payload LIKE ? ORDER BY received_at", f"%{like}%")

    def alive(self) -> None:
        for name in ("persister", "agent"):
            assert self.procs.procs[name].poll() is None, f"{name} stopped:\n{self.procs.log(name)[-3000:]}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile")
    broker = start_broker(tmp)
    procs = Procs(tmp)
    prefix = new_prefix()
    cfg = write_config(tmp, "stack", broker.port, prefix, agent={"id": A}, log={"level": "info"})
    procs.start("persister", "fleet-persister", "--config", str(cfg))
    wait_persister_ready(procs, "persister")
    procs.start("agent", "fleet-agent", "--config", str(cfg))
    s = Stack(broker, procs, tmp, prefix, cfg)
    wait_for(lambda: rows(s.db, "SELECT 1 FROM agents WHERE agent_id = ? AND online = 1", A), 30,
             what="the agent's birth stored")
    s.settle()
    s.rss_start = psutil.Process(procs.procs["persister"].pid).memory_info().rss  # type: ignore[attr-defined]
    yield s
    s.close()
    procs.close()
    broker.stop()


# ----------------------------------------------------------------------------- 1. nothing stalls storage

def test_a_far_future_timestamp_is_a_dead_letter_and_storage_goes_on(stack: Stack) -> None:
    """The message that stopped all storage for good (collected_at in year 9999, the issue's
    mosquitto_pub) and its twin on a request are dead letters (bad_timestamp); what follows is stored."""
    stack.send(stack.topics.response("a1", "cpu"), b'{"v":1,"id":"p1","agent_id":"a1","type":"cpu","status":"ok",'
                                                   b'"data":{},"collected_at":"9999-12-31T23:59:59.999Z"}')
    far = {"id": new_id(), "type": "cpu", "issued_at": "9999-12-31T23:59:59.999Z"}
    stack.send(stack.topics.request(B, "cpu"), far)
    stack.settle()
    assert [d["reason"] for d in stack.dead('"p1"')] == ["bad_timestamp"]
    assert [d["reason"] for d in stack.dead(far["id"])] == ["bad_timestamp"]
    assert "ahead of this receiver's clock" in stack.dead('"p1"')[0]["detail"]
    assert stack.record("p1") == {} and stack.record(far["id"]) == {}
    stack.alive()


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00.000Z", "2026-01-01T00:00:00+14:00", "1970-01-01T00:00:00Z"])
def test_a_timestamp_far_behind_the_persisters_clock_is_a_dead_letter(stack: Stack, when: str) -> None:
    """Timestamps more than 30 days behind (year 0001, the epoch, a date months ago) are refused too."""
    req = stack.ask(B, "cpu")
    stack.answer(B, "cpu", req.id, collected_at=when)
    stack.settle()
    assert [d["reason"] for d in stack.dead(req.id)] == ["bad_timestamp"]
    assert stack.record(req.id)["state"] == "pending"


def test_an_agent_clock_an_hour_off_is_stored_with_the_persisters_time(stack: Stack) -> None:
    """An agent an hour ahead is not refused: its answer is stored, answered_at is when the persister
    received it, and latency is the real one (well under a second here), not an hour."""
    req = stack.ask(B, "memory")
    before = time.time()
    stack.answer(B, "memory", req.id, collected_at=iso(time.time() + 3600))
    stack.settle()
    rec = stack.record(req.id)
    assert rec["state"] == "ok" and 0 <= rec["latency_ms"] < 5000, rec
    assert before - 1 <= _epoch(rec["answered_at"]) <= time.time()
    assert _epoch(rec["expire_at"]) < time.time() + 31 * 86400  # retention from the persister's clock


# ----------------------------------------------------------------------------- 2. an answer fills only its own request

def test_another_agents_answer_never_fills_a_request(stack: Stack) -> None:
    """host-b answering, on its own topic, a request sent to host-a is a dead letter (request_mismatch);
    host-a's record stays its own and host-a's real answer (from the real agent) fills it."""
    req = stack.ask(A, "cpu")
    stack.answer(B, "cpu", req.id, data=example("cpu", percent=99.9))
    reply = wait_for(lambda: stack.answers.get(req.id), 20, what="the real agent's answer")
    assert reply["agent_id"] == A and reply["status"] == "ok"
    stack.settle()
    rec = stack.record(req.id)
    assert (rec["agent_id"], rec["state"]) == (A, "ok") and loads(rec["data"])["percent"] != 99.9
    assert [(d["reason"], d["topic"]) for d in stack.dead(req.id)] == [
        ("request_mismatch", stack.topics.response(B, "cpu"))]


def test_an_answer_stored_before_its_request_is_displaced_when_the_request_names_another_agent(
        stack: Stack) -> None:
    """Answer-first: host-b's answer to an id reaches the persister before the request for host-a with that
    id; when the request comes, host-b's answer leaves for rejected, and the record is host-a's."""
    rid = new_id()
    stack.answer(B, "disk", rid)
    stack.settle()
    assert stack.record(rid)["agent_id"] == B
    stack.send(stack.topics.request(A, "disk"), Request(id=rid, type="disk", issued_at=iso(time.time()),
                                                        expires_at=iso(time.time() + 60)).payload())
    wait_for(lambda: stack.answers.get(rid), 20, what="the real agent's answer")
    stack.settle()
    rec = stack.record(rid)
    assert (rec["agent_id"], rec["state"]) == (A, "ok"), rec
    assert loads(rec["data"])["partitions"] != example("disk")["partitions"]  # the real host's disks
    assert [d["reason"] for d in stack.dead(rid)] == ["request_mismatch"]


def test_an_answer_on_another_type_does_not_fill_a_request(stack: Stack) -> None:
    """A cpu request is not filled by an answer carrying its id on res/memory."""
    req = stack.ask(B, "cpu")
    stack.answer(B, "memory", req.id)
    stack.settle()
    rec = stack.record(req.id)
    assert (rec["type"], rec["state"], rec["data"]) == ("cpu", "pending", None)
    assert [d["reason"] for d in stack.dead(req.id)] == ["request_mismatch"]


def test_a_request_id_reused_for_another_agent_is_a_dead_letter(stack: Stack) -> None:
    """The same request id sent to a second agent is recorded in rejected, not silently dropped, and so
    is that agent's answer to it; the record stays the first agent's."""
    req = stack.ask(B, "ping")
    stack.send(stack.topics.request(A, "ping"), Request(id=req.id, type="ping").payload())
    wait_for(lambda: stack.answers.get(req.id), 20, what="the real agent's answer")
    stack.settle()
    assert stack.record(req.id)["agent_id"] == B
    assert sorted((d["reason"], d["topic"]) for d in stack.dead(req.id)) == sorted([
        ("request_mismatch", stack.topics.request(A, "ping")), ("request_mismatch", stack.topics.response(A, "ping"))])


def test_the_readme_mosquitto_rr_with_a_fixed_id_never_mixes_agents(stack: Stack) -> None:
    """The README's by-hand request sent with one fixed id to an agent that does not exist and then to
    the real one: no record says the phantom answered with the real host's data."""
    fixed = f"by-hand-{uuid.uuid4().hex[:6]}"
    stack.send(stack.topics.request("nosuchhost", "cpu"), {"id": fixed})
    stack.send(stack.topics.request(A, "cpu"), {"id": fixed}, correlation=fixed.encode())
    wait_for(lambda: stack.answers.get(fixed), 20, what="the real agent's answer")
    stack.settle()
    rec = stack.record(fixed)
    assert (rec["agent_id"], rec["state"], rec["data"]) == ("nosuchhost", "pending", None)
    assert sorted((d["reason"], d["topic"]) for d in stack.dead(fixed)) == sorted([
        ("request_mismatch", stack.topics.request(A, "cpu")), ("request_mismatch", stack.topics.response(A, "cpu"))])


# ----------------------------------------------------------------------------- 3. a per-type contract

@pytest.mark.parametrize(("type_", "data", "says"), [
    ("cpu", example("cpu", percent="hello"), "data.percent is a string, not a number"),
    ("cpu", {"percent": 1.0, "blob": "x" * 3_000_000}, "larger than"),
    ("disk", example("disk", partitions=["x"]), "data.partitions[0] is a string, not an object"),
    ("processes", {"processes": {"nginx": {"pid": 1, "rss": 1}}}, "data.processes is an object, not an array"),
])
def test_built_in_data_of_the_wrong_shape_is_a_dead_letter_naming_the_field(stack: Stack, type_: str,
                                                                           data: dict[str, Any], says: str) -> None:
    """The answers the issue found stored as ok are bad_data, the detail naming the field; the request
    stays pending, and the dashboard's series for the agent still answer."""
    req = stack.ask(B, type_)
    stack.answer(B, type_, req.id, data=data)
    stack.settle()
    dead = stack.dead(req.id)
    assert [d["reason"] for d in dead] == ["bad_data"] and says in dead[0]["detail"], dead
    assert stack.record(req.id)["state"] == "pending"
    store = SqliteStore(str(stack.db))
    try:
        page = create_app(load_config(str(stack.config)), store).test_client().get(f"/api/agent/{B}/series?range=1h")
        assert page.status_code == 200, page.data[:500]
    finally:
        store.close()


# ----------------------------------------------------------------------------- smaller hostile inputs

def _response(req_id: str, **fields: Any) -> dict[str, Any]:
    return {**Response.ok(req_id, B, "cpu", example("cpu"), 1.0).to_dict(), **fields}


SMALL = [  # (name, what to send: "res" to a fresh cpu request of host-b, or "status"), reason
    ("a negative duration_ms", "res", lambda rid: _response(rid, duration_ms=-5), "bad_duration_ms"),
    ("an ok answer that also carries an error", "res",
     lambda rid: _response(rid, error={"code": "timeout", "message": "x"}), "bad_error"),
    ("an error answer that also carries data", "res",
     lambda rid: _response(rid, status="error", error={"code": "timeout", "message": "x"}), "bad_data"),
    ("a key twice (the second agent_id another agent's)", "res",
     lambda rid: json.dumps(_response(rid))[:-1].encode() + b', "agent_id": "host-a"}', "duplicate_key"),
    ("a key twice inside data", "res",
     lambda rid: json.dumps(_response(rid)).replace('"percent": 12.5', '"percent": 12.5, "percent": 99').encode(),
     "duplicate_key"),
    ("control characters in a hostname", "status",
     lambda rid: Status(agent_id=B, online=True, hostname="evil\x1b[2Jhost").payload(), "bad_hostname"),
    ("a 10,000-character hostname", "status",
     lambda rid: Status(agent_id=B, online=True, hostname="h" * 10_000).payload(), "bad_hostname"),
    ("10,000 advertised types", "status",
     lambda rid: Status(agent_id=B, online=True, types=[f"t{i}" for i in range(10_000)]).payload(), "bad_types"),
    ("a type advertised twice", "status",
     lambda rid: Status(agent_id=B, online=True, types=["cpu", "cpu"]).payload(), "bad_types"),
    ("1,000 labels", "status",
     lambda rid: Status(agent_id=B, online=True, labels={f"k{i}": "v" for i in range(1000)}).payload(), "bad_labels"),
    ("a label value with control characters", "status",
     lambda rid: Status(agent_id=B, online=True, labels={"role": "web\x1b[2J"}).payload(), "bad_labels"),
    ("labels that are not a mapping", "status",
     lambda rid: Status(agent_id=B, online=True, extra={"labels": ["role=web"]}).payload(), "bad_labels"),
    ("a status ts a year ahead", "status",
     lambda rid: Status(agent_id=B, online=True, ts=iso(time.time() + 366 * 86400)).payload(), "bad_timestamp"),
]


@pytest.mark.parametrize(("name", "where", "make", "reason"), SMALL, ids=[s[0] for s in SMALL])
def test_smaller_hostile_inputs_are_dead_letters_with_their_reason(stack: Stack, name: str, where: str,
                                                                   make: Any, reason: str) -> None:
    """Each is refused with its own reason, stores nothing as an answer, and does not change the agent."""
    req = stack.ask(B, "cpu")
    before = rows(stack.db, "SELECT hostname, types FROM agents WHERE agent_id = ?", B)
    payload = make(req.id)
    topic = stack.topics.response(B, "cpu") if where == "res" else stack.topics.status(B)
    stack.send(topic, payload)
    stack.settle()
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    dead = [d for d in rows(stack.db, "SELECT * FROM rejected WHERE topic = ? AND reason = ?", topic, reason)
            if d["payload"] == raw[:2048].decode("utf-8", "replace")]
    assert len(dead) == 1, (name, rows(stack.db, "SELECT reason, detail FROM rejected ORDER BY received_at DESC "
                                                 "LIMIT 3"))
    assert stack.record(req.id)["state"] == "pending"
    assert rows(stack.db, "SELECT hostname, types FROM agents WHERE agent_id = ?", B) == before


def test_an_empty_retained_status_clears_without_a_dead_letter(stack: Stack) -> None:
    """Clearing a retained status (an empty retained payload) is legitimate: the persister ignores it."""
    topic = stack.topics.status("host-gone")
    stack.send(topic, Status(agent_id="host-gone", online=False).payload(), retain=True)
    stack.send(topic, b"", retain=True)
    stack.settle()
    assert rows(stack.db, "SELECT * FROM rejected WHERE topic = ?", topic) == []
    assert rows(stack.db, "SELECT online FROM agents WHERE agent_id = ?", "host-gone") == [{"online": 0}]


def test_sort_by_given_as_a_list_is_a_bad_request_naming_the_param(stack: Stack) -> None:
    """The agent answers processes params of the wrong type with bad_request naming the param (it
    used to fail the collector with `unhashable type`), and the answer is stored as the request's result."""
    req = stack.ask(A, "processes", params={"sort_by": ["rss"]})
    reply = wait_for(lambda: stack.answers.get(req.id), 20, what="the agent's answer")
    assert reply["status"] == "error" and reply["error"]["code"] == "bad_request", reply
    assert "params.sort_by is an array, not a string" in reply["error"]["message"]
    stack.settle()
    assert stack.record(req.id)["state"] == "error"


# ----------------------------------------------------------------------------- memory

def test_thousands_of_hostile_messages_leave_the_persisters_memory_bounded(stack: Stack) -> None:
    """After everything above, 2,000 more of its kinds (far timestamps, foreign answers, wrong shapes,
    repeated keys, 10,000 types) leave the persister alive, storing, and within RSS_GROWTH_LIMIT_MB."""
    kinds = [
        lambda rid: (stack.topics.response(B, "cpu"), _response(rid, collected_at="9999-12-31T23:59:59.999Z")),
        lambda rid: (stack.topics.response(B, "cpu"), _response(rid, data=example("cpu", percent="x"))),
        lambda rid: (stack.topics.response(B, "cpu"), json.dumps(_response(rid))[:-1].encode() + b', "v": 1}'),
        lambda rid: (stack.topics.status(B), Status(agent_id=B, online=True,
                                                    types=[f"t{i}" for i in range(10_000)]).payload()),
        lambda rid: (stack.topics.response("host-c", "cpu"), {**_response(rid), "agent_id": "host-c"}),
    ]
    for _ in range(2):
        for i in range(1000):
            topic, payload = kinds[i % len(kinds)](new_id())
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            stack.client.publish(topic, raw, qos=1)
        stack.settle()
    stack.alive()
    grown = (psutil.Process(stack.procs.procs["persister"].pid).memory_info().rss
             - stack.rss_start) / 2 ** 20  # type: ignore[attr-defined]
    print(f"persister RSS grew by {grown:.1f} MiB over the hostile suite")
    assert grown < RSS_GROWTH_LIMIT_MB


def _epoch(text: str) -> float:
    from fleet_common import parse_iso

    return parse_iso(text)
