"""The agent: answers requests on <prefix>/<id>/req/<type> with collector readings.

Agent wires four parts together, each in its own module and testable alone:
- intake.Intake parses and routes each request (on paho's network thread);
- dispatch.Dispatcher runs collectors on a bounded pool, with a watchdog answering `timeout`;
- publisher.DurablePublisher puts every answer in the durable outbox, publishes it while
  connected, deletes it on PUBACK and replays what is waiting after every (re)connect;
- presence.Presence publishes birth, goodbye and Last Will, and keeps the counters.
No request can stop the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from fleet_common.config import Config
from fleet_common.link import Link
from fleet_common.messages import MAX_PAYLOAD_BYTES, Response
from fleet_common.topics import Topics, check_agent_id, sanitise_agent_id

from . import presence
from .collectors import REGISTRY, Collector, prime_all
from .dispatch import Dispatcher
from .intake import Answer, Dispatch, Intake, Job
from .outbox import Outbox
from .publisher import DurablePublisher

log = logging.getLogger("fleet.agent")


class Agent:
    """A fleet agent for one host.

    Agent(cfg, agent_id=None, collectors=None)
      cfg         fleet_common Config (mqtt.*, agent.*)
      agent_id    overrides cfg.agent.id (default: the sanitised host name)
      collectors  request type -> collector (default: the global registry, built-ins included)

    start() connects in the background and returns; stop() says goodbye (offline
    status) and disconnects; run(stop_event) does both around waiting for the event.
    """

    def __init__(self, cfg: Config, agent_id: str | None = None,
                 collectors: dict[str, Collector] | None = None) -> None:
        self.cfg = cfg
        self.id = check_agent_id(agent_id or cfg.agent.id or sanitise_agent_id())
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.collectors: dict[str, Collector] = REGISTRY if collectors is None else collectors
        self.timeout_s = float(cfg.agent.collector_timeout_s) or 10.0
        self.workers = max(1, int(cfg.agent.workers))
        self._stopping = threading.Event()
        self.link = Link(cfg.mqtt, self.id, clean_start=False, session_expiry_s=cfg.agent.session_expiry_s,
                         will=presence.will(self.topics, self.id), username=cfg.mqtt.username or self.id,
                         logger=logging.getLogger("fleet.link"))
        self.outbox = Outbox(cfg.agent.outbox_path, cfg.agent.outbox_max_messages)
        self.presence = presence.Presence(self.id, self.topics, self.link, self.outbox, lambda: self.types,
                                          cfg.agent.labels)
        self.intake = Intake(self.id, self.topics, self.collectors, self._stopping)
        self.dispatcher = Dispatcher(self.id, self.workers, self.timeout_s, self._answer, self._drop)
        self.publisher = DurablePublisher(self.outbox, self.link, self._stopping, on_tick=self.presence.report_drops)
        self.link.on_connect_hooks.append(self._on_connect)
        self.link.client.on_message = self._on_message
        self.link.client.on_publish = self._on_publish

    @property
    def types(self) -> list[str]:
        return sorted(self.collectors)

    @property
    def stats(self) -> dict[str, int]:
        """The request counters (presence.COUNTERS), as of now."""
        return self.presence.counters.snapshot()

    @property
    def busy(self) -> int:
        """Number of collectors still running (a hung one keeps counting)."""
        return self.dispatcher.busy

    def health(self) -> dict[str, Any]:
        return self.presence.health()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Agent:
        """Prime the collectors, start the workers and connect (in the background; retries forever)."""
        prime_all(self.collectors)
        self.dispatcher.start()
        self.publisher.start()
        log.info("agent %r starting: broker %s, topic prefix %r, %d types (%s)", self.id, self.link.where,
                 self.topics.prefix, len(self.types), ", ".join(self.types))
        self.link.start()
        return self

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        return self.link.wait_connected(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Let running collectors answer (briefly), publish the offline status, disconnect."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + min(2.0, timeout_s / 2)
        while (self.busy or self.publisher.unacked) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.link.stop(before_disconnect=lambda: self.presence.goodbye(wait_s=timeout_s / 2))
        self.dispatcher.stop()
        self.publisher.stop()
        counts = self.outbox.counts()
        log.info("agent %r stopped (%s; outbox: %d waiting for the next start, %d dropped)", self.id,
                 ", ".join(f"{k} {v}" for k, v in self.stats.items()), counts["queued"], counts["dropped"])

    def run(self, stop_event: threading.Event) -> int:
        """Serve until stop_event is set (e.g. by SIGTERM), then stop cleanly; returns the exit code."""
        self.start()
        try:
            stop_event.wait()
        finally:
            log.info("agent %r stopping", self.id)
            self.stop()
        return 0

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------- paho callbacks
    def _on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(self.topics.agent_requests(self.id), qos=1)
        self.presence.announce()
        self.publisher.replay()
        log.debug("subscribed to %s and published birth status", self.topics.agent_requests(self.id))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, bytes(msg.payload), msg.properties)
        except Exception:  # the agent never dies of a request
            self.presence.counters.count("dropped")
            log.exception("unexpected error handling a message on %r", msg.topic[:200])

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.publisher.acked(mid)

    # ----------------------------------------------------------------- requests
    def handle(self, topic: str, payload: bytes, properties: Any = None) -> None:
        """Answer one request message (called on paho's network thread)."""
        self.presence.counters.count("received")
        routed = self.intake.route(topic, payload, properties)
        if isinstance(routed, Dispatch):
            self.dispatcher.submit(routed.job, routed.collector)
        elif isinstance(routed, Answer):
            self._answer(routed.job, routed.response)
        else:
            self._drop(routed.topic, routed.why)

    def _drop(self, topic: str, why: str) -> None:
        self.presence.counters.count("dropped")
        log.debug("dropped a message on %r: %s", topic[:200], why)

    def _answer(self, job: Job, response: Response) -> bool:
        """Send the job's answer unless it has one already; False if it had."""
        if not job.claim():
            return False
        payload = response.payload()
        if len(payload) > MAX_PAYLOAD_BYTES:
            # the broker disconnects a client that publishes more than its message_size_limit, and
            # the outbox would resend it after every reconnect: answer with the reason instead
            response = Response.fail(response.id, self.id, response.type, "collector_failed",
                                     f"answer of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte "
                                     "message limit", duration_ms=response.duration_ms)
            payload = response.payload()
        self.publisher.send(job.reply_to, payload, job.correlation)
        code = self.presence.answered(response)
        log.debug("answered %s request %s on %s: %s (%.1f ms)", response.type, response.id, job.reply_to,
                  code, response.duration_ms or 0.0)
        return True


__all__ = ["Agent"]
