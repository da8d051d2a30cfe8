"""One simulated agent: its own MQTT 5 connection, client id, birth and Last Will, and an
answer to every request, as the real agent gives it (same topics, properties and errors)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common.errors import ContractError
from fleet_common.link import no_delay, publish_properties
from fleet_common.messages import Response, Status, ok_response_payload, parse_request
from fleet_common.topics import Topics

from . import __version__
from .synthetic import TYPES, BadParams, Host

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger("fleet.sim.agent")
PLATFORM = "Linux-6.1.0-21-amd64-x86_64-with-glibc2.36"


class SimAgent:
    """Connect with `connect()`; the fleet's loop does the I/O. `done` resolves on CONNACK."""

    __slots__ = ("client", "connected", "fleet", "host", "id", "labels", "pending", "status_topic", "was_online")

    def __init__(self, fleet: Fleet, agent_id: str, labels: dict[str, str] | None = None) -> None:
        self.fleet, self.id, self.labels = fleet, agent_id, labels
        topics: Topics = fleet.topics
        self.host = Host(agent_id, fleet.settings.processes)
        self.status_topic = topics.status(agent_id)
        self.connected = False
        self.was_online = False
        self.pending: asyncio.Future[bool] | None = None
        cfg = fleet.mqtt
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=mqtt.MQTTv5,
                        userdata=self, reconnect_on_failure=False)
        c.username_pw_set(cfg.username or agent_id, cfg.password)
        if cfg.tls.enabled:
            c.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file)
        c.will_set(self.status_topic, Status(agent_id=agent_id, online=False).payload(), qos=1, retain=True)
        c.on_connect = _on_connect
        c.on_disconnect = _on_disconnect
        c.on_message = _on_message
        fleet.glue.attach(c)
        self.client = c

    def connect(self) -> asyncio.Future[bool]:
        """Open the TCP connection and send CONNECT; the future is True on CONNACK success."""
        self.pending = self.fleet.loop.create_future()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.fleet.settings.session_expiry_s
        try:
            self.client.connect(self.fleet.mqtt.host, self.fleet.mqtt.port, keepalive=self.fleet.settings.keepalive_s,
                                clean_start=self.fleet.settings.session_expiry_s == 0, properties=props)
        except OSError as exc:
            log.debug("%s: cannot connect: %s", self.id, exc)
            self.pending.set_result(False)
            return self.pending
        no_delay(self.client)  # as the real agent does (fleet_common.link)
        return self.pending

    def birth(self) -> Status:
        return Status(agent_id=self.id, online=True, hostname=self.id, platform=PLATFORM,
                      agent_version=f"{__version__}+sim", types=list(self.fleet.settings.types), labels=self.labels)

    def say_goodbye(self) -> None:
        if self.connected:
            self.client.publish(self.status_topic, Status(agent_id=self.id, online=False).payload(), qos=1,
                                retain=True)

    def disconnect(self) -> None:
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = self.fleet.settings.session_expiry_s
        self.client.disconnect(properties=props)

    # requests
    def answer(self, topic: str, payload: bytes, properties: Any) -> None:
        fleet = self.fleet
        stats = fleet.stats
        stats.received += 1
        started = time.perf_counter()
        reply_to = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        try:
            parsed = fleet.topics.parse(topic)
            if parsed.kind != "req" or parsed.agent_id != self.id or parsed.type is None:
                raise ContractError("bad_topic", "not a request for this agent")
            req = parse_request(payload, parsed)
        except ContractError as exc:
            stats.dropped += 1
            log.debug("%s dropped a message on %s: %s", self.id, topic, exc)
            return
        type_ = parsed.type
        reply_to = fleet.topics.reply(self.id, type_, reply_to)
        if req.is_expired(time.time()):
            body = Response.fail(req.id, self.id, type_, "expired", f"request expired at {req.expires_at}").payload()
        elif type_ not in fleet.settings.types:
            body = Response.fail(req.id, self.id, type_, "unknown_type",
                                 f"this agent answers {', '.join(fleet.settings.types)}").payload()
        else:
            try:
                data = self.host.reading(type_, req.params)
            except BadParams as exc:
                body = Response.fail(req.id, self.id, type_, "bad_request", str(exc)).payload()
            else:
                body = ok_response_payload(req.id, self.id, type_, data, (time.perf_counter() - started) * 1000.0)
                stats.ok += 1
        props = publish_properties(correlation=correlation) if correlation is not None else None
        self.client.publish(reply_to, body, qos=1, properties=props)
        stats.answered += 1
        stats.bytes_out += len(body)


# paho callbacks, shared by every agent (userdata is the SimAgent)
def _on_connect(client: mqtt.Client, agent: SimAgent, flags: Any, reason: Any, props: Any) -> None:
    ok = not reason.is_failure
    if ok:
        agent.connected = True
        if agent.was_online:
            agent.fleet.stats.reconnects += 1
        agent.was_online = True
        agent.fleet.stats.connected += 1
        client.subscribe(agent.fleet.topics.agent_requests(agent.id), qos=1)
        client.publish(agent.status_topic, agent.birth().payload(), qos=1, retain=True)
    else:
        log.warning("%s: broker refused the connection: %s", agent.id, reason)
    if agent.pending is not None and not agent.pending.done():
        agent.pending.set_result(ok)


def _on_disconnect(client: mqtt.Client, agent: SimAgent, flags: Any, reason: Any, props: Any) -> None:
    if agent.connected:
        agent.fleet.stats.connected -= 1
    agent.connected = False
    if agent.pending is not None and not agent.pending.done():
        agent.pending.set_result(False)
    agent.fleet.lost(agent)


def _on_message(client: mqtt.Client, agent: SimAgent, msg: mqtt.MQTTMessage) -> None:
    try:
        agent.answer(msg.topic, bytes(msg.payload), msg.properties)
    except Exception:  # a simulated agent, like a real one, never dies of a request
        agent.fleet.stats.dropped += 1
        log.exception("%s: unexpected error answering on %s", agent.id, msg.topic)


__all__ = ["TYPES", "SimAgent"]
