"""What the broker says about messages it threw away, followed by the persister and the controller.

Mosquitto drops a QoS 1 message silently when a client's queue is full (max_queued_messages):
an answer already acknowledged to its agent is then lost on its way to the persister. Its
$SYS tree counts those drops (`$SYS/broker/publish/messages/dropped`) and the messages it
holds (`$SYS/broker/store/messages/count`), every sys_interval (10 s by default). A
BrokerWatch subscribes to both on the service's own connection, warns in the log (at most once
a minute) when the drops grow, and gives its figures to the heartbeat file and the metrics. A
broker that publishes no $SYS tree (sys_interval 0, or another broker) is said once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

DROPPED = "$SYS/broker/publish/messages/dropped"
STORED = "$SYS/broker/store/messages/count"
VERSION = "$SYS/broker/version"  # retained from the broker's start: there is a $SYS tree
TOPICS = (DROPPED, STORED, VERSION)
WARN_EVERY_S = 60.0
NO_SYS_AFTER_S = 5.0

Clock = Callable[[], float]


class BrokerWatch:
    """Attach to a paho client with `attach(client)`; call `subscribe(client)` on every connect."""

    def __init__(self, log: logging.Logger, advice: str, clock: Clock = time.time) -> None:
        self.log, self.advice, self._clock = log, advice, clock
        self.dropped: int | None = None  # the broker's count since it started
        self.dropped_first: int | None = None  # as first seen by this process
        self.stored: int | None = None
        self.stored_max: int | None = None
        self.version: str | None = None
        self._warned_at = float("-inf")
        self._warned_count: int | None = None
        self._said_no_sys = False
        self.subscribe_mid: int | None = None  # the owner's on_subscribe leaves this one alone
        self._lock = threading.Lock()

    def attach(self, client: Any) -> None:
        for topic in TOPICS:
            client.message_callback_add(topic, self._on_message)

    def subscribe(self, client: Any, session_present: bool = False) -> None:
        """QoS 0: the broker sends its $SYS figures unacknowledged, and a persister that
        acknowledges by hand has nothing to acknowledge for them."""
        self.subscribe_mid = client.subscribe([(topic, 0) for topic in TOPICS])[1]
        if not self._said_no_sys and self.version is None:
            timer = threading.Timer(NO_SYS_AFTER_S, self._check_sys)
            timer.name, timer.daemon = "broker-watch", True
            timer.start()

    def _check_sys(self) -> None:
        if self.version is None and not self._said_no_sys:
            self._said_no_sys = True
            self.log.warning("the broker publishes no $SYS tree (Mosquitto's sys_interval 0, or another broker): "
                             "messages it drops cannot be seen here")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            text = bytes(msg.payload).decode("ascii", "replace").strip()
        except Exception:  # a broker's $SYS payload is plain text; anything else is ignored
            return
        with self._lock:
            if msg.topic == VERSION:
                self.version = text
            elif text.isdigit():
                value = int(text)
                if msg.topic == STORED:
                    self.stored = value
                    self.stored_max = value if self.stored_max is None else max(self.stored_max, value)
                else:
                    self._on_dropped(value)

    def _on_dropped(self, value: int) -> None:
        self.dropped = value
        if self.dropped_first is None:
            self.dropped_first = value
        now = self._clock()
        grew = value > (self._warned_count if self._warned_count is not None else 0)
        if grew and now - self._warned_at >= WARN_EVERY_S:
            self._warned_at, self._warned_count = now, value
            self.log.warning("the broker has dropped %d messages since it started (max_queued_messages reached for "
                             "a client); %s", value, self.advice)

    def snapshot(self) -> dict[str, Any]:
        """For the heartbeat file and the metrics. `dropped` is None while the broker has dropped
        nothing (it publishes the count only once it changes), or publishes no $SYS tree."""
        with self._lock:
            return {"sys": self.version is not None, "dropped": self.dropped, "stored": self.stored,
                    "stored_max": self.stored_max}


ADVICE = ("raise the broker's max_queued_messages, give the persister more room (persister.receive_maximum, "
          "more persisters) or lower controller.max_dispatch_per_s")

__all__ = ["ADVICE", "DROPPED", "STORED", "TOPICS", "BrokerWatch"]
