"""The MQTT link every component uses: one paho MQTT 5 client, jittered reconnect
backoff, TLS and credentials from config, and one log line per state change."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .backoff import Backoff
from .compat import PackedProperties
from .config import MqttConfig

OnConnect = Callable[[mqtt.Client, bool], None]
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: a newer connection came with the same client id
# After a takeover, wait this long (doubling each time, to the cap) before taking the id back:
# two clients with one id that reconnect at once kick each other off about once a second.
TAKEOVER_BACKOFF_S = (30.0, 900.0)
# Brokers that close the older connection without saying why (Mosquitto 2.0.11 sends no DISCONNECT):
# this many losses in a row, each this soon after the broker accepted us, are taken for a takeover.
SHORT_LIVED_S, SHORT_LIVED_IN_A_ROW = 5.0, 2


def no_delay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off on the client's socket. MQTT packets are small and most wait for
    an answer (a PUBACK, a response): with Nagle on at either end a request and its answer took
    87 ms on loopback (TCP's delayed acknowledgement, once per side); off at both ends, 0.4 ms.
    Mosquitto's side is `set_tcp_nodelay true` in broker_config/*.conf."""
    setsockopt = getattr(client.socket(), "setsockopt", None)  # None: not connected, or websockets
    if setsockopt is None:
        return
    try:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket
        pass


def publish_properties(response_topic: str | None = None, correlation: bytes | None = None,
                       expiry_s: int | None = None) -> Properties | None:
    """PUBLISH properties packed once (fleet_common.compat.PackedProperties), or None for none."""
    if response_topic is None and correlation is None and expiry_s is None:
        return None
    return PackedProperties(response_topic, correlation, expiry_s)


class Link:
    """A long-lived connection to the broker; use as a context manager or start()/stop()."""

    def __init__(self, cfg: MqttConfig, client_id: str, *, clean_start: bool = True,
                 session_expiry_s: int = 0, receive_maximum: int | None = None,
                 manual_ack: bool = False, will: tuple[str, bytes] | None = None,
                 username: str | None = None, logger: logging.Logger | None = None,
                 max_inflight: int = 1000, max_unacked: int = 0, count_unacked: bool = False) -> None:
        """`max_inflight` QoS 1 messages are sent before their acks, the rest wait in paho (0: no
        limit); `max_unacked` bounds both together, and publish() past it fails (0: no bound).
        With `count_unacked`, the link counts what the broker has not acknowledged yet (it takes
        paho's on_publish), for wait_for_room()."""
        self.cfg, self.client_id = cfg, client_id
        self.log = logger or logging.getLogger("fleet.link")
        self.clean_start, self.session_expiry_s, self.receive_maximum = clean_start, session_expiry_s, receive_maximum
        self.on_connect_hooks: list[OnConnect] = []
        self.on_disconnect_hooks: list[Callable[[], None]] = []  # on losing (or closing) a connection
        self.connected = threading.Event()
        # What the broker's CONNACK allows in flight from us (MQTT 5 Receive Maximum; Mosquitto
        # says its max_inflight_messages): a client that sends more has them queued, and past
        # max_queued_messages dropped, at the broker.
        self.server_receive_maximum = 65535
        self.unacked = 0
        self._room = threading.Condition()
        self._max_unacked = max_unacked
        self.reconnects = 0
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._failures = 0
        self._ever_connected = False
        self.takeovers = 0
        self._takeover_backoff = Backoff(*TAKEOVER_BACKOFF_S)
        self._connected_at = 0.0
        self._short_lived = 0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        manual_ack=manual_ack)
        user = username if username is not None else cfg.username
        if user is not None:
            c.username_pw_set(user, cfg.password)
        if cfg.tls.enabled:
            c.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(max_unacked)
        if count_unacked:
            c.on_publish = self._on_publish
        self.client = c
        self._jitter()

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def _jitter(self) -> float:
        delay = self._backoff.next()
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        return delay

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
        return props

    def start(self) -> Link:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                  clean_start=self.clean_start, properties=self._connect_properties())
        self.client.loop_start()
        return self

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        return self.connected.wait(timeout_s)

    def stop(self, before_disconnect: Callable[[], None] | None = None, timeout_s: float = 5.0) -> None:
        """Optionally publish last words, then disconnect cleanly (keeping the session) and stop the loop."""
        if self.connected.is_set() and before_disconnect is not None:
            before_disconnect()
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self.connected.clear()

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self._room:
                self.unacked += 1
        return info

    def window(self) -> int:
        """How many QoS 1 publishes may wait for their acks: the broker's Receive Maximum, or
        max_unacked where that is smaller."""
        return min(self.server_receive_maximum, self._max_unacked or self.server_receive_maximum)

    def wait_for_room(self, timeout_s: float) -> bool:
        """Wait until fewer than window() publishes are unacknowledged (count_unacked links)."""
        with self._room:
            return self._room.wait_for(lambda: self.unacked < self.window(), max(0.0, timeout_s))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._room:
            self.unacked = max(0, self.unacked - 1)
            self._room.notify()

    # paho callbacks (run on the network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            delay = self._jitter()
            self.log.error("broker at %s refused the connection as %r: %s; retrying in %.1f s",
                           self.where, self.client_id, reason, delay)
            return
        no_delay(client)
        self.server_receive_maximum = int(getattr(props, "ReceiveMaximum", 65535) or 65535)
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._failures = 0
        self._backoff.reset()
        self._jitter()
        self._connected_at = time.monotonic()
        self.log.info("connected to broker at %s as %r%s", self.where, self.client_id,
                      " (session resumed)" if flags.session_present else "")
        for hook in self.on_connect_hooks:
            try:
                hook(client, bool(flags.session_present))
            except Exception:  # paho re-raises from callbacks, which would end the network thread
                self.log.exception("on-connect hook %r failed", hook)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if not was:
            return
        for hook in self.on_disconnect_hooks:
            try:
                hook()
            except Exception:  # as for on-connect hooks: never end the network thread
                self.log.exception("on-disconnect hook %r failed", hook)
        lasted_s = time.monotonic() - self._connected_at
        self._short_lived = self._short_lived + 1 if lasted_s < SHORT_LIVED_S else 0
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._taken_over("took the session over (MQTT 5 reason 142)")
        elif reason.is_failure and self._short_lived >= SHORT_LIVED_IN_A_ROW:
            self._taken_over(f"most likely took the session over (the broker closed the connection {self._short_lived}"
                             f" times in a row within {SHORT_LIVED_S:.0f} s of accepting it, without saying why)")
        elif reason.is_failure or reason.value != 0:
            delay = self._jitter()
            self.log.warning("lost connection to broker at %s (%s); reconnecting in %.1f s",
                             self.where, reason, delay)
        else:
            self.log.info("disconnected from broker at %s", self.where)

    def _taken_over(self, how: str) -> None:
        """Another client connected with our client id: back off for long (growing), rather than
        take the id back at once and be taken over again, and say once per takeover what to do."""
        self.takeovers += 1
        self._short_lived = 0
        delay = self._takeover_backoff.next()
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        self.log.error("another client connected to the broker at %s with the same client id %r and %s; give "
                       "each client its own id (for agents: agent.id, --id or FLEET_AGENT_ID) and stop the other "
                       "one; trying again in %.0f s (takeover %d)",
                       self.where, self.client_id, how, delay, self.takeovers)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        delay = self._jitter()
        self._failures += 1
        level = logging.WARNING if self._failures in (1, 10, 100) or self._failures % 1000 == 0 else logging.DEBUG
        self.log.log(level, "cannot reach broker at %s (attempt %d); retrying in %.1f s",
                     self.where, self._failures, delay)
