"""Request intake: what the agent does with one message on <prefix>/<id>/req/<type>.

Intake.route() turns a message into one of three outcomes, and does nothing else (no MQTT,
no threads): `Drop` (not a request this agent answers, or one without a usable id), `Answer`
(answered at once: bad request, expired, unknown type) or `Dispatch` (a job for a collector).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

from fleet_common.errors import ContractError
from fleet_common.messages import Request, Response, parse_request
from fleet_common.timefmt import is_valid_id
from fleet_common.topics import Topics

from .collectors import Collector


class Job:
    """One accepted request on its way to an answer; answered exactly once (claim())."""

    __slots__ = ("answered", "correlation", "lock", "reply_to", "req", "started")

    def __init__(self, req: Request, reply_to: str, correlation: bytes | None) -> None:
        self.req, self.reply_to, self.correlation = req, reply_to, correlation
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.answered = False

    def claim(self) -> bool:
        with self.lock:
            if self.answered:
                return False
            self.answered = True
            return True

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


class Drop(NamedTuple):
    """No answer: `why` is logged (at debug) and counted as dropped."""

    topic: str
    why: str


class Answer(NamedTuple):
    """Answered at once, without a collector."""

    job: Job
    response: Response


class Dispatch(NamedTuple):
    """A job for `collector`."""

    job: Job
    collector: Collector


Routed = Union[Drop, Answer, Dispatch]


class Intake:
    """Intake(agent_id, topics, collectors, stopping): route() one request message.

    While `stopping` is set, well-formed requests are dropped (no worker will take them);
    malformed ones with an id are still answered `bad_request`, at no cost."""

    def __init__(self, agent_id: str, topics: Topics, collectors: Mapping[str, Collector],
                 stopping: threading.Event) -> None:
        self.id, self.topics, self.collectors, self._stopping = agent_id, topics, collectors, stopping

    def route(self, topic: str, payload: bytes, properties: Any = None) -> Routed:
        reply_to = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        try:
            parsed = self.topics.parse(topic)
        except ContractError as exc:
            return Drop(topic, f"bad topic: {exc}")
        if parsed.kind != "req" or parsed.agent_id != self.id or parsed.type is None:
            return Drop(topic, "not a request for this agent")
        type_ = parsed.type
        try:
            req = parse_request(payload, parsed)
        except ContractError as exc:
            req_id = recover_id(payload, correlation)
            if req_id is None:
                return Drop(topic, f"bad request without a usable id: {exc}")
            job = Job(Request(id=req_id, type=type_), self.topics.reply(self.id, type_, reply_to), correlation)
            return Answer(job, Response.fail(req_id, self.id, type_, "bad_request", str(exc)))
        job = Job(req, self.topics.reply(self.id, type_, reply_to), correlation)
        if self._stopping.is_set():
            return Drop(topic, "agent is stopping")
        if req.is_expired(time.time()):
            return Answer(job, Response.fail(req.id, self.id, type_, "expired", f"request expired at {req.expires_at}"))
        collector = self.collectors.get(type_)
        if collector is None:
            return Answer(job, Response.fail(req.id, self.id, type_, "unknown_type",
                                             f"this agent answers {', '.join(sorted(self.collectors))}"))
        return Dispatch(job, collector)


def recover_id(payload: bytes, correlation: bytes | None) -> str | None:
    """The request id of a malformed request, from its JSON or its CorrelationData, if either holds one."""
    try:
        obj = json.loads(payload.decode("utf-8"))
        if isinstance(obj, dict) and is_valid_id(obj.get("id")):
            return str(obj["id"])
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    if isinstance(correlation, (bytes, bytearray)):
        try:
            text = bytes(correlation).decode("ascii")
        except UnicodeDecodeError:
            return None
        if is_valid_id(text):
            return text
    return None


__all__ = ["Answer", "Dispatch", "Drop", "Intake", "Job", "Routed", "recover_id"]
