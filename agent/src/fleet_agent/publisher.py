"""DurablePublisher: every answer goes to the durable outbox (outbox.py) first and is handed
to paho only while connected. A "courier" thread deletes an entry from the outbox on its PUBACK
and (re)sends what is waiting at start-up, on every (re)connect, and whenever entries are
found that were never handed to paho. So an answer outlives a lost link and a killed agent;
resending is safe because the persister's writes are idempotent.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol, Union

from fleet_common.link import publish_properties

from .outbox import Outbox

log = logging.getLogger("fleet.agent")

COURIER_CHECK_S = 2.0  # how often the courier looks for entries never handed to paho
ACK_LINGER_S = 0.5  # acknowledged answers leave the outbox in batches this far apart (sooner when stopping)
RESEND_CHUNK = 200


class Transport(Protocol):
    """What the publisher needs of fleet_common's Link (and what a test's fake provides)."""

    connected: threading.Event

    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ..., properties: Any = ...) -> Any:
        ...

    def wait_connected(self, timeout_s: float | None = ...) -> bool:
        ...


class Acked(NamedTuple):
    """The broker acknowledged (PUBACK) the message paho sent with message id `mid`."""

    mid: int


class Signal(enum.Enum):
    REPLAY = "replay"  # (re)connected: hand paho every outbox entry it does not hold
    STOP = "stop"


CourierItem = Union[Acked, Signal]


class DurablePublisher:
    """DurablePublisher(outbox, link, stopping, on_tick): send() stores an answer and publishes it
    (QoS 1) when connected; acked(mid) from paho's on_publish; replay() after each connect.

    `on_tick` is called from the courier every COURIER_CHECK_S; `stopping` cuts the batching of
    acks short and ends a replay."""

    def __init__(self, outbox: Outbox, link: Transport, stopping: threading.Event,
                 on_tick: Callable[[], None] = lambda: None) -> None:
        self.outbox, self.link, self._stopping, self._on_tick = outbox, link, stopping, on_tick
        # _lock makes "stored in the outbox, handed to paho, mid recorded" one step, so a
        # PUBACK (seen by the courier, never on the network thread) always finds its mid.
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._handed: set[int] = set()  # outbox seqs paho holds (it resends them after a reconnect)
        self._queue: queue.Queue[CourierItem] = queue.Queue()
        self._courier: threading.Thread | None = None

    @property
    def unacked(self) -> int:
        """Answers handed to paho and not acknowledged yet."""
        return len(self._handed)

    def start(self) -> None:
        self._courier = threading.Thread(target=self._run, name="outbox-courier", daemon=True)
        self._courier.start()
        if self.outbox.queued or self.outbox.dropped:
            log.info("outbox %s: %d answers waiting from before, %d dropped so far", self.outbox.path,
                     self.outbox.queued, self.outbox.dropped)

    def stop(self) -> None:
        """Stop the courier (after it has deleted what was acknowledged) and close the outbox."""
        if self._courier is not None:
            self._queue.put(Signal.STOP)
            self._courier.join(5)
        with self._lock:
            self.outbox.close()

    def send(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        with self._lock:
            seq = self.outbox.put(topic, payload, correlation)
            if self.link.connected.is_set():  # else it waits in the outbox, not in paho's memory
                self._hand_over(seq, topic, payload, correlation)

    def acked(self, mid: int) -> None:
        """Called from paho's on_publish, which holds paho's own lock: only queue the mid here."""
        self._queue.put(Acked(mid))

    def replay(self) -> None:
        self._queue.put(Signal.REPLAY)

    def _hand_over(self, seq: int, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """Publish one outbox entry (caller holds _lock). QoS 1: paho keeps it until
        PUBACK and resends it after a reconnect, so it is not handed over twice."""
        props = publish_properties(correlation=correlation) if correlation is not None else None
        try:
            info = self.link.publish(topic, payload, qos=1, properties=props)
        except (ValueError, TypeError) as exc:  # cannot ever be sent (e.g. too large): do not retry forever
            log.error("answer on %r cannot be published (%s); removed from the outbox", topic[:200], exc)
            self.outbox.delete([seq])
            return
        self._inflight[info.mid] = seq
        self._handed.add(seq)

    def _take(self) -> list[CourierItem]:
        """What has come in: waits up to COURIER_CHECK_S for the first item. After a PUBACK it
        lets the next ones gather for a moment, so they are deleted together: this thread is not
        waiting on the queue meanwhile, so their puts do not wake it, and at a few answers a
        second it wakes twice per ACK_LINGER_S, not per answer."""
        items: list[CourierItem] = []
        try:
            items.append(self._queue.get(timeout=COURIER_CHECK_S))
            if isinstance(items[0], Acked):
                self._stopping.wait(ACK_LINGER_S)
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def _run(self) -> None:
        next_check = time.monotonic() + COURIER_CHECK_S
        while True:
            items = self._take()
            periodic = time.monotonic() >= next_check
            if periodic:
                next_check = time.monotonic() + COURIER_CHECK_S
            try:
                self._delete_acked([item.mid for item in items if isinstance(item, Acked)])
                if Signal.STOP in items:
                    return
                if Signal.REPLAY in items or (periodic and self.outbox.queued > len(self._handed)):
                    self._resend()
                if periodic:
                    self._on_tick()
            except Exception:  # the courier must outlive a failing disk; entries wait for the next round
                log.exception("outbox courier failed; retrying in %.0f s", COURIER_CHECK_S)

    def _delete_acked(self, mids: list[int]) -> None:
        if not mids:
            return
        with self._lock:
            seqs = [self._inflight.pop(m) for m in mids if m in self._inflight]
            self._handed.difference_update(seqs)
            self.outbox.delete(seqs)

    def _resend(self) -> None:
        """Hand paho every outbox entry it does not hold yet, in order, while connected."""
        after, sent = 0, 0
        while self.link.wait_connected(5) and not self._stopping.is_set():
            with self._lock:
                entries = self.outbox.entries(after, RESEND_CHUNK)
                for seq, topic, payload, correlation in entries:
                    if seq not in self._handed:
                        self._hand_over(seq, topic, payload, correlation)
                        sent += 1
            if len(entries) < RESEND_CHUNK:
                break
            after = entries[-1][0]
        if sent:
            log.info("sent %d answers from the outbox", sent)


__all__ = ["ACK_LINGER_S", "COURIER_CHECK_S", "RESEND_CHUNK", "Acked", "DurablePublisher", "Signal", "Transport"]
