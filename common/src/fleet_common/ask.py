"""Asking an agent: the one place a request is built (its topic, payload and MQTT 5 properties),
and `ask()`, which sends one and waits for the answer (`fleetctl request`, the dashboard's
"ask now"). The controller sends what `build_request` makes, thousands a second."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from .config import Config
from .errors import FleetError
from .link import Link, publish_properties
from .messages import JsonObject, Request, Response, parse_response
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
                  params: JsonObject | None = None, now_s: float | None = None) -> OutgoingRequest:
    """A request for `type_` to `agent_id`, issued at `now_s` (default: now) and expiring `ttl_s`
    later; the broker holds it for an offline agent at most that long (at least a second)."""
    now = time.time() if now_s is None else now_s
    request = Request(id=new_id(), type=type_, params=params or {}, issued_at=iso(now), expires_at=iso(now + ttl_s))
    topic, reply_topic = topics.request_and_response(agent_id, type_)
    props = publish_properties(reply_topic, request.id.encode(), int(ttl_s))
    return OutgoingRequest(topic, request, props, reply_topic)


def ask(cfg: Config, agent_id: str, type_: str, params: JsonObject | None = None,
        timeout_s: float = 10.0) -> Response:
    """Publish one request with ResponseTopic and CorrelationData, and wait for the matching answer;
    NoAnswer if none comes within `timeout_s`."""
    check_agent_id(agent_id)
    check_type(type_)
    topics = cfg.mqtt.topics()
    out = build_request(topics, agent_id, type_, timeout_s, params)
    req_id = out.request.id
    answer: dict[str, Response] = {}
    got = threading.Event()
    subscribed = threading.Event()
    link = Link(cfg.mqtt, f"fleetctl-{uuid.uuid4().hex[:12]}")

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        try:
            res = parse_response(bytes(msg.payload), topics.parse(msg.topic))
        except FleetError:
            return
        if res.id == req_id or corr == req_id.encode():
            answer["res"] = res
            got.set()

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    def subscribe(client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(out.reply_topic, qos=1)

    link.client.on_message = on_message
    link.client.on_subscribe = on_subscribe
    link.on_connect_hooks.append(subscribe)
    link.start()
    try:
        if not link.wait_connected(timeout_s):
            raise NoAnswer(f"cannot reach the broker at {link.where}; is it running? (see mqtt.host/mqtt.port)")
        if not subscribed.wait(timeout_s):
            raise NoAnswer(f"the broker did not confirm the subscription to {out.reply_topic}")
        link.publish(out.topic, out.payload(), qos=1, properties=out.properties)
        if not got.wait(timeout_s):
            raise NoAnswer(f"no answer from agent {agent_id!r} for {type_!r} within {timeout_s:g} s; "
                           "is it online? ('fleetctl status' shows the fleet)")
        return answer["res"]
    finally:
        link.stop()
