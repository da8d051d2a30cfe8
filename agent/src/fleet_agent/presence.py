"""Presence: what the agent says about itself on <prefix>/<id>/status (retained, QoS 1).

A birth message on every connect (host details, types, and its own counters and outbox
figures: the agent serves no metrics), the same offline message as its Last Will and as its
goodbye, a fresh birth when the outbox's drop count changes, and a log line when a type's
collector starts or stops failing.
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
from typing import Any, Callable, Protocol

from fleet_common.messages import Response, Status
from fleet_common.topics import Topics

from . import __version__
from .outbox import Outbox

log = logging.getLogger("fleet.agent")

COUNTERS = ("received", "answered", "ok", "errors", "timeouts", "dropped")


class StatusLink(Protocol):
    """What presence needs of fleet_common's Link."""

    connected: threading.Event

    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Any:
        ...


def offline(agent_id: str) -> Status:
    return Status(agent_id=agent_id, online=False)


def will(topics: Topics, agent_id: str) -> tuple[str, bytes]:
    """The Last Will (topic, payload) to connect with: the broker says the agent is offline for it."""
    return topics.status(agent_id), offline(agent_id).payload()


class Counters:
    """The agent's request counters (COUNTERS), safe to bump from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def count(self, key: str) -> None:
        with self._lock:
            self._values[key] += 1

    def answered(self, code: str) -> None:
        """One answer sent, with error code `code` ("ok" for a reading)."""
        with self._lock:
            self._values["answered"] += 1
            self._values["ok" if code == "ok" else "errors"] += 1
            if code == "timeout":
                self._values["timeouts"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Presence:
    """Presence(agent_id, topics, link, outbox, types, labels): `types` gives the request types the
    agent answers, sorted, when a birth is made; `labels` (agent.labels) go into every birth."""

    def __init__(self, agent_id: str, topics: Topics, link: StatusLink, outbox: Outbox,
                 types: Callable[[], list[str]], labels: dict[str, str] | None = None) -> None:
        self.id, self.link, self.outbox, self._types = agent_id, link, outbox, types
        self.labels = dict(labels or {})
        self.topic = topics.status(agent_id)
        self.counters = Counters()
        self._health: dict[str, str] = {}  # type -> last outcome, to log changes only
        self._reported_drops = outbox.dropped

    def birth(self) -> Status:
        return Status(agent_id=self.id, online=True, hostname=socket.gethostname(), platform=platform.platform(),
                      agent_version=__version__, types=self._types(), labels=self.labels or None,
                      extra=self.health())

    def health(self) -> dict[str, Any]:
        """The agent's own counters: in its status message (it serves no metrics) and its heartbeat."""
        return {"outbox": self.outbox.counts(), "counters": self.counters.snapshot()}

    def announce(self) -> None:
        """Publish the birth (on each connect)."""
        self.publish(self.birth())

    def goodbye(self, wait_s: float) -> None:
        """Publish the offline status and wait up to wait_s for the broker to confirm it."""
        self.publish(offline(self.id), wait_s)

    def publish(self, status: Status, wait_s: float = 0.0) -> None:
        info = self.link.publish(self.topic, status.payload(), qos=1, retain=True)
        if wait_s > 0:
            try:
                info.wait_for_publish(wait_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed by the broker: %s", exc)

    def report_drops(self) -> None:
        """A changed drop count goes out in a fresh status message, not only in the log."""
        dropped = self.outbox.dropped
        if dropped != self._reported_drops and self.link.connected.is_set():
            self._reported_drops = dropped
            self.announce()

    def answered(self, response: Response) -> str:
        """Count one answer and note what it says about its type's collector; returns its code."""
        code = "ok" if response.status == "ok" else (response.error or {}).get("code", "error")
        self.counters.answered(code)
        self._note_health(response.type, code, response)
        return code

    def _note_health(self, type_: str, code: str, response: Response) -> None:
        """Log when a type's collector starts or stops failing, not on every answer."""
        if code not in ("ok", "collector_failed", "timeout"):
            return  # bad requests and expiries say nothing about this host
        before = self._health.get(type_, "ok")
        self._health[type_] = code
        if code != before:
            if code == "ok":
                log.info("collector %s works again", type_)
            else:
                log.warning("collector %s: %s: %s", type_, code, (response.error or {}).get("message", ""))


__all__ = ["COUNTERS", "Counters", "Presence", "StatusLink", "offline", "will"]
