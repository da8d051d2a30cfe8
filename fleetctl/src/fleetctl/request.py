"""`fleetctl request`: ask one agent now, wait for its answer, print it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Dict, Optional

import paho.mqtt.client as mqtt

from fleet_common.config import Config
from fleet_common.errors import FleetError
from fleet_common.link import Link, publish_properties
from fleet_common.messages import Request, Response, parse_response
from fleet_common.timefmt import iso, new_id, now_iso
from fleet_common.topics import check_agent_id, check_type


class NoAnswer(FleetError):
    pass


def parse_params(pairs: list[str]) -> Dict[str, Any]:
    """key=value pairs; values are JSON when they parse as JSON (limit=5 -> 5), else strings."""
    params: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FleetError(f"--param {pair!r} must look like key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def ask(cfg: Config, agent_id: str, type_: str, params: Optional[Dict[str, Any]] = None,
        timeout_s: float = 10.0) -> Response:
    """Publish one request with ResponseTopic and CorrelationData, and wait for the matching answer."""
    check_agent_id(agent_id)
    check_type(type_)
    topics = cfg.mqtt.topics()
    req = Request(id=new_id(), type=type_, params=params or {}, issued_at=now_iso(),
                  expires_at=iso(time.time() + timeout_s))
    reply_topic = topics.response(agent_id, type_)
    answer: Dict[str, Response] = {}
    got = threading.Event()
    subscribed = threading.Event()
    link = Link(cfg.mqtt, f"fleetctl-{uuid.uuid4().hex[:12]}")

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        try:
            res = parse_response(bytes(msg.payload), topics.parse(msg.topic))
        except FleetError:
            return
        if res.id == req.id or corr == req.id.encode():
            answer["res"] = res
            got.set()

    link.client.on_message = on_message
    link.client.on_subscribe = lambda *a: subscribed.set()

    def subscribe(client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(reply_topic, qos=1)

    link.on_connect_hooks.append(subscribe)
    link.start()
    try:
        if not link.wait_connected(timeout_s):
            raise NoAnswer(f"cannot reach the broker at {link.where}; is it running? (see mqtt.host/mqtt.port)")
        if not subscribed.wait(timeout_s):
            raise NoAnswer(f"the broker did not confirm the subscription to {reply_topic}")
        props = publish_properties(reply_topic, req.id.encode(), int(timeout_s) or 1)
        link.publish(topics.request(agent_id, type_), req.payload(), qos=1, properties=props)
        if not got.wait(timeout_s):
            raise NoAnswer(f"no answer from agent {agent_id!r} for {type_!r} within {timeout_s:g} s; "
                           "is it online? ('fleetctl status' shows the fleet)")
        return answer["res"]
    finally:
        link.stop()

