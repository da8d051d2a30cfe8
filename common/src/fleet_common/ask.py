"""Asking an agent: the one place a request is built (its topic, payload and MQTT 5 properties),
and `ask()`, which sends one and waits for the answer (`fleetctl request`, the dashboard's
"ask now"). The controller sends what `build_request` makes, thousands a second."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from .config import Config
from .errors import FleetError
from .link import Link, publish_properties
from .messages import JsonObject, Request, Response, Status, parse_response, parse_status
from .timefmt import iso, new_id
from .topics import Topics, check_agent_id, check_type


class NoAnswer(FleetError):
    """No answer came: the broker is unreachable, or the agent did not reply in time."""


class OutgoingRequest(NamedTuple):
    topic: str  # <prefix>/<agent_id>/req/<type>
    request: Request
    properties: Properties | None  # ResponseTopic, CorrelationData (the id), MessageExpiryInterval
    reply_topic: str  # where the agent answers: <prefix>/<agent_id>/res/<type>

    def payload(self) -> bytes:
        return self.request.payload()


def build_request(topics: Topics, agent_id: str, type_: str, ttl_s: float,
                  params: JsonObject | None = None, now_s: float | None = None,
                  job: str | None = None) -> OutgoingRequest:
    """A request for `type_` to `agent_id`, issued at `now_s` (default: now) and expiring `ttl_s`
    later; the broker holds it for an offline agent at most that long (at least a second).
    `job`: the job it is part of (fleet_common.jobs)."""
    now = time.time() if now_s is None else now_s
    request = Request(id=new_id(), type=type_, params=params or {}, issued_at=iso(now), expires_at=iso(now + ttl_s),
                      job=job)
    topic, reply_topic = topics.request_and_response(agent_id, type_)
    props = publish_properties(reply_topic, request.id.encode(), int(ttl_s))
    return OutgoingRequest(topic, request, props, reply_topic)


KNOWN_SHOWN = 5  # agents named when the one asked for was never seen


def ask(cfg: Config, agent_id: str, type_: str, params: JsonObject | None = None,
        timeout_s: float = 10.0, notice: Callable[[str], None] | None = None) -> Response:
    """Publish one request with ResponseTopic and CorrelationData, and wait for the matching answer;
    NoAnswer if none comes within `timeout_s`.

    The agent's retained status is read first: an agent that never connected fails at once (no
    request is sent, so none is left pending), naming a few known agents; for one that is offline,
    `notice` is told that the request waits at the broker until it expires."""
    check_agent_id(agent_id)
    check_type(type_)
    if not timeout_s > 0:
        raise FleetError(f"the timeout must be more than 0 seconds, not {timeout_s:g}")
    topics = cfg.mqtt.topics()
    out = build_request(topics, agent_id, type_, timeout_s, params)
    req_id = out.request.id
    answer: dict[str, Response] = {}
    statuses: dict[str, Status] = {}
    got = threading.Event()
    # SUBACKs come in order, each after the retained messages of the subscriptions before it: the
    # reply topic's SUBACK means the agent's retained status, if there is one, has arrived.
    acked: dict[int, threading.Event] = {}
    link = Link(cfg.mqtt, f"fleetctl-{uuid.uuid4().hex[:12]}")

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            where = topics.parse(msg.topic)
            if where.kind == "status":
                statuses[where.agent_id] = parse_status(bytes(msg.payload), where)
                return
            res = parse_response(bytes(msg.payload), where)
        except FleetError:
            return
        corr = getattr(msg.properties, "CorrelationData", None)
        if res.id == req_id or corr == req_id.encode():
            answer["res"] = res
            got.set()

    refused: set[int] = set()  # subscriptions the broker's ACL refused

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, *_: Any) -> None:
        if any(getattr(code, "is_failure", False) for code in codes or ()):
            refused.add(mid)
        acked.setdefault(mid, threading.Event()).set()

    def subscribe(topic: str, qos: int) -> int:
        """The subscription's message id; acked[mid] is set when the broker acknowledges it."""
        _, mid = link.client.subscribe(topic, qos=qos)
        acked.setdefault(mid or 0, threading.Event())
        return mid or 0

    mids: list[int] = []  # the agent's status, then the reply topic

    def on_connect(client: mqtt.Client, session_present: bool) -> None:
        mids.clear()
        mids.append(subscribe(topics.status(agent_id), 0))  # QoS 0: a retained status comes ahead of the next SUBACK
        mids.append(subscribe(out.reply_topic, 1))

    link.client.on_message = on_message
    link.client.on_subscribe = on_subscribe
    link.on_connect_hooks.append(on_connect)
    link.start()
    try:
        if not link.wait_connected(timeout_s):
            raise NoAnswer(f"cannot reach the broker at {link.where}; is it running? (see mqtt.host/mqtt.port)")
        if len(mids) < 2 or not acked[mids[1]].wait(timeout_s):
            raise NoAnswer(f"the broker did not confirm the subscription to {out.reply_topic}")
        status = statuses.get(agent_id)
        may_read_status = mids[0] not in refused  # an ACL without `read <prefix>/+/status`: ask blind
        if status is None and may_read_status:
            subscribe(topics.all_status(), 0)
            acked[subscribe(topics.status(agent_id), 0)].wait(min(timeout_s, 2.0))  # after every retained status
            raise NoAnswer(never_seen(agent_id, link.where, topics, statuses))
        if status is not None and not status.online and notice is not None:
            notice(f"agent {agent_id!r} is offline (since {status.ts}): the request waits at the broker until it "
                   f"expires, {timeout_s:g} s from now, and is answered if the agent reconnects by then")
        link.publish(out.topic, out.payload(), qos=1, properties=out.properties)
        if not got.wait(timeout_s):
            status = statuses.get(agent_id)
            if status is None:
                raise NoAnswer(f"no answer from agent {agent_id!r} for {type_!r} within {timeout_s:g} s; is it "
                               "online? ('fleetctl status' shows the fleet)")
            if not status.online:
                raise NoAnswer(f"no answer from agent {agent_id!r} for {type_!r} within {timeout_s:g} s: it is "
                               f"offline (since {status.ts}) and the request expired at the broker")
            raise NoAnswer(f"no answer from agent {agent_id!r} for {type_!r} within {timeout_s:g} s, though it is "
                           "online: it is busy or its collector is slow; try a longer --timeout")
        return answer["res"]
    finally:
        link.stop()


def never_seen(agent_id: str, where: str, topics: Topics, statuses: dict[str, Status]) -> str:
    """Why an agent with no retained status is refused, naming a few that have one (online first)."""
    known = sorted(statuses.values(), key=lambda s: (not s.online, s.agent_id))
    names = ", ".join(f"{s.agent_id} ({'online' if s.online else 'offline'})" for s in known[:KNOWN_SHOWN])
    more = f" and {len(known) - KNOWN_SHOWN} more" if len(known) > KNOWN_SHOWN else ""
    fleet = f"known agents: {names}{more}" if known else "no agent has connected yet"
    return (f"agent {agent_id!r} has never connected to the broker at {where} (no retained status on "
            f"{topics.status(agent_id)}); {fleet}; 'fleetctl status' lists the fleet")
