"""The persister service: validate every request, response and status, write them in
batches, and acknowledge each message to the broker only after its batch is committed.

Threads: paho's network thread queues what it receives (`on_message`), and parses it too
unless parse workers do that (see parsing.py); one named writer thread batches, writes,
acknowledges, and runs the expiry sweep and purge between batches. The store is
therefore used by one thread only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet_common import Config, Request, Response, Topics, iso, new_id, sanitise_agent_id
from fleet_common.backoff import Backoff
from fleet_common.brokerwatch import ADVICE, BrokerWatch
from fleet_common.config import PersisterConfig
from fleet_common.health import Readiness
from fleet_common.link import Link
from fleet_common.topics import SHARE_GROUP
from fleet_store import ENCODES_JSON, Batch, RejectedRecord, StoreWriter, refused

from .parsing import Ignored, Item, ParseStage, Raw, parse_message

log = logging.getLogger("fleet.persister")

PURGE_EVERY_SWEEPS = 12
SHUTDOWN_GRACE_S = 10.0

@dataclass(frozen=True)
class Received:
    """One queued message: what to store, and what to acknowledge once it is stored.
    `generation` is the connection it came on: after a reconnect the broker redelivers
    unacknowledged messages, and a packet id from an old connection must not be acked."""

    item: Item
    mid: int
    qos: int
    generation: int


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    write_failures: int = 0
    ignored: int = 0
    expired: int = 0
    purged: int = 0
    last_commit_ms: float | None = None
    last_commit_at: str | None = None


def client_id(cfg: Config) -> str:
    """persister.client_id, else mqtt.client_id, else one made from the host name."""
    return cfg.persister.client_id or cfg.mqtt.client_id or f"persister-{sanitise_agent_id()}"[:64]


def usable_cores() -> int:
    """Cores this process may run on (a container's cpuset, taskset), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def parse_workers(pcfg: PersisterConfig) -> int:
    """persister.parse_workers, or when unset: one per usable core beyond the first, up to 4."""
    if pcfg.parse_workers is not None:
        return pcfg.parse_workers
    return max(0, min(4, usable_cores() - 1))


def _batch_of(items: list[Any]) -> Batch:
    """Stored items (parsed messages and dead letters) sorted into a Batch, in arrival order."""
    batch = Batch()
    for it in items:
        if isinstance(it, RejectedRecord):
            batch.rejected.append(it)
        elif isinstance(it.message, Request):
            batch.requests.append(it)
        elif isinstance(it.message, Response):
            batch.responses.append(it)
        else:
            batch.statuses.append(it)
    return batch


def _store_refused(item: Any, exc: Exception) -> RejectedRecord:
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(item, RejectedRecord):  # even its dead letter was refused: keep what surely fits
        return dataclasses.replace(item, id=new_id(), reason="store_refused", payload="",
                                   detail=f"{detail}; it was rejected as {item.reason}")
    return refused(item, "store_refused", detail)


class Persister:
    def __init__(self, cfg: Config, store: StoreWriter) -> None:
        self.cfg, self.pcfg, self.store = cfg, cfg.persister, store
        self.topics: Topics = cfg.mqtt.topics()
        self.counters = Counters()
        # Bounded: Mosquitto 2.0.11 does not keep to the Receive Maximum once acks flow, and would
        # otherwise hand over its whole backlog (up to max_queued_messages) to be held in memory here.
        # When the queue is full the network thread stops reading, and TCP holds the broker back.
        self.queue: queue.Queue[Received] = queue.Queue(maxsize=max(self.pcfg.receive_maximum,
                                                                    self.pcfg.batch_size))
        self.link = Link(cfg.mqtt, client_id(cfg), clean_start=False,
                         session_expiry_s=self.pcfg.session_expiry_s,
                         receive_maximum=self.pcfg.receive_maximum, manual_ack=True, logger=log)
        self.broker = BrokerWatch(log, ADVICE)
        self.broker.attach(self.link.client)
        # Ready: the broker has acknowledged our subscriptions and any left over in a resumed
        # session from other settings are gone, so what is published from now on is stored once.
        self.ready = Readiness()
        self._subscribed = False
        self.link.on_connect_hooks.append(self._subscribe)
        self.link.on_connect_hooks.append(self.broker.subscribe)
        self.link.on_disconnect_hooks.append(self.ready.clear)
        self.link.client.on_message = self._on_message
        self.link.client.on_subscribe = self._on_subscribe
        self.link.client.on_unsubscribe = self._on_unsubscribe
        self._unsubscribing: tuple[int | None, list[str]] = (None, [])  # (mid, filters) of the last UNSUBSCRIBE
        self._generation = 0
        self._accepting = threading.Event()
        self._accepting.set()
        self._writer_done = threading.Event()
        self._sweeps = 0
        self._next_sweep = 0.0
        self._sweep_failing = False
        self.workers = parse_workers(self.pcfg)
        self.encode = self.pcfg.store in ENCODES_JSON  # data as the JSON text the store keeps
        self.stage: ParseStage | None = None

    # network thread
    def _subscribe(self, client: mqtt.Client, session_present: bool) -> None:
        self._generation += 1
        self.ready.clear()
        self._subscribed = False
        self._unsubscribing = (None, [])
        qos1 = SubscribeOptions(qos=1)
        wanted = self._data_filters()
        # retained status is delivered only on a plain subscription
        client.subscribe([(f, qos1) for f in wanted] + [(self.topics.all_status(), qos1)])
        if session_present:
            # A session kept from a run with other settings still holds their subscriptions, and
            # each would deliver every message once more. Left only after the new ones are in
            # place, so nothing falls in between; what the session has queued is delivered anyway.
            stale = [f for f in self._data_filters_in_any_form() if f not in wanted]
            self._unsubscribing = (client.unsubscribe(stale)[1], stale)

    def _data_filters(self) -> list[str]:
        """Requests and responses: plain by default (every message reaches this persister), or in
        the configured share group so several split the load. The group is a secret: Mosquitto 2.0
        lets anyone join a group and drops what it hands a member that may not read it."""
        plain = [self.topics.all_requests(), self.topics.all_responses()]
        if not self.pcfg.shared_subscription:
            return plain
        assert self.pcfg.share_group is not None  # load_config requires it
        return [Topics.shared(f, self.pcfg.share_group) for f in plain]

    def _data_filters_in_any_form(self) -> list[str]:
        """Every form of them this session can have had that can be named: plain, the fixed group of
        earlier versions, and the configured group (a group since changed cannot be named)."""
        plain = [self.topics.all_requests(), self.topics.all_responses()]
        groups = [SHARE_GROUP] + ([self.pcfg.share_group] if self.pcfg.share_group else [])
        return plain + [Topics.shared(f, group) for group in groups for f in plain]

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        sent_mid, filters = self._unsubscribing
        if mid != sent_mid:
            return
        left = [f for f, r in zip(filters, reasons) if r.value == 0]  # the rest: 17, no such subscription
        log.log(logging.INFO if left else logging.DEBUG, "left the subscriptions of other settings that the "
                "resumed session held: %s", ", ".join(left) or "none")
        self._unsubscribing = (None, [])
        self.ready.set(self._subscribed)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid == self.broker.subscribe_mid:
            return
        if any(r.is_failure for r in reasons):
            log.error("broker refused a subscription: %s", reasons)
        else:
            log.info("receiving requests, responses and status under %s/", self.topics.prefix)
            self._subscribed = True
            self.ready.set(self._unsubscribing[0] is None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting.is_set():
            return  # not acknowledged: the broker keeps it in our session for the next start
        self.counters.received += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers refuse such topics; still never crash on input
            topic = "<topic is not UTF-8>"
        raw: Raw = (topic, bytes(msg.payload), bool(msg.retain), time.time())
        meta = (msg.mid, msg.qos, self._generation)
        stage = self.stage
        item = self.parse(*raw) if stage is None else None
        while True:
            try:
                if stage is not None:
                    stage.put(raw, meta, timeout=0.5)
                else:
                    self._deliver(item, meta, timeout=0.5)  # type: ignore[arg-type]
                break
            except queue.Full:
                if not self._accepting.is_set():
                    return  # stopping: not acknowledged, so the broker delivers it again
        log.debug("queued message %d on %s", msg.mid, topic)

    def parse(self, topic: str, payload: bytes, retained: bool, received_s: float) -> Item:
        """Validate one message; anything wrong with it becomes a RejectedRecord, never an exception."""
        item = parse_message(self.topics, topic, payload, retained, received_s, encode=self.encode)
        self._count(item)
        return item

    # network thread, or the parse stage's pass-on thread
    def _count(self, item: Item) -> None:
        if not isinstance(item, RejectedRecord):
            return
        reason = item.reason
        if not self.counters.rejected[reason]:
            log.warning("first rejected message with reason %r (on %s); see the rejected table", reason, item.topic)
        else:
            log.debug("rejected message on %s: %s", item.topic, reason)
        self.counters.rejected[reason] += 1

    def _deliver(self, item: Item, meta: tuple[int, int, int], timeout: float | None = None) -> None:
        """Queue for the writer; with no timeout, wait as long as the writer runs."""
        received = Received(item, *meta)
        while True:
            try:
                self.queue.put(received, timeout=0.5 if timeout is None else timeout)
                return
            except queue.Full:
                if timeout is not None or self._writer_done.is_set():
                    raise

    def _passed_on(self, item: Item, meta: tuple[int, int, int]) -> None:
        self._count(item)
        try:
            self._deliver(item, meta)
        except queue.Full:
            pass  # the writer has stopped: not acknowledged, so the broker delivers it again

    # writer thread
    def run(self, stop: threading.Event) -> int:
        """Connect, persist until `stop` is set, then drain, disconnect and return an exit code."""
        if self.workers:
            # What is held stays within what the writer's queue holds without workers, plus one
            # batch: the stage holds that less one batch (or half of it), the queue one batch.
            rm, bs = self.pcfg.receive_maximum, self.pcfg.batch_size
            try:
                self.stage = ParseStage(self.topics, self.workers, self.encode,
                                        self._passed_on, max(rm - bs, rm // 2, 1)).start()
                self.queue = queue.Queue(maxsize=bs)
            except (OSError, RuntimeError) as exc:  # e.g. no /dev/shm for multiprocessing's locks
                log.warning("cannot start parse worker processes (%s: %s); parsing on the network thread",
                            type(exc).__name__, exc)
                self.workers = 0
        log.info("persister %r starting: store %s, batches of up to %d messages or %.2f s, %s",
                 self.link.client_id, self.pcfg.store, self.pcfg.batch_size, self.pcfg.batch_wait_s,
                 f"{self.workers} parse worker process{'es' if self.workers > 1 else ''}" if self.workers
                 else "parsing on the network thread")
        self.link.start()
        writer = threading.Thread(target=self._writer, args=(stop,), name="persister-writer", daemon=True)
        writer.start()
        stop.wait()
        log.info("stopping: no longer taking messages; committing and acknowledging what is queued")
        self._accepting.clear()
        writer.join(SHUTDOWN_GRACE_S + self.pcfg.batch_wait_s + 5)
        drained = not writer.is_alive() and self.queue.empty() and self._stage_idle()
        if self.stage is not None:
            self.stage.stop(5.0)
        self.link.stop()
        self.store.close()
        c = self.counters
        log.info("stopped: received %d, stored %d, rejected %d, batches %d%s", c.received, c.stored,
                 sum(c.rejected.values()), c.batches,
                 "" if drained else f"; {self.queue.qsize()} messages left unacknowledged for redelivery")
        return 0 if drained else 1

    def _writer(self, stop: threading.Event) -> None:
        try:
            self._write_until_stopped(stop)
        finally:
            self._writer_done.set()

    def _write_until_stopped(self, stop: threading.Event) -> None:
        deadline: float | None = None
        while True:
            if stop.is_set() and deadline is None:
                deadline = time.monotonic() + SHUTDOWN_GRACE_S
            batch = self._take(stop)
            if batch:
                if not self._commit(batch, deadline):
                    return
            elif stop.is_set() and self._stage_idle():
                return
            self._sweep()

    def _stage_idle(self) -> bool:
        return self.stage is None or self.stage.idle()

    def _take(self, stop: threading.Event) -> list[Received]:
        """Up to batch_size messages: wait for the first, then at most batch_wait_s for more."""
        try:
            waiting = 0.05 if self.stage is not None else 0.0  # stopping: for what the parse stage holds
            first = self.queue.get(timeout=waiting if stop.is_set() else min(self.pcfg.sweep_interval_s, 0.5))
        except queue.Empty:
            return []
        taken = [first]
        until = time.monotonic() + self.pcfg.batch_wait_s
        while len(taken) < self.pcfg.batch_size:
            try:
                taken.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = until - time.monotonic()
            if left <= 0 or stop.is_set():
                break
            try:  # in short slices, so a stop request does not wait for a slow batch to fill
                taken.append(self.queue.get(timeout=min(left, 0.1)))
            except queue.Empty:
                pass
        return taken

    def _commit(self, taken: list[Received], deadline: float | None) -> bool:
        """Write until it succeeds (nothing is acked before), then ack; False if shutdown gave up."""
        items = [r.item for r in taken if not isinstance(r.item, Ignored)]
        ignored = len(taken) - len(items)
        batch = _batch_of(items)
        backoff, failures = Backoff(0.1, 5.0), 0
        while True:
            started = time.monotonic()
            try:
                turned_away = self._write(batch)
                break
            except Exception as exc:
                failures += 1
                self.counters.write_failures += 1
                if failures == 1:
                    log.error("store write failed (%s: %s); retrying the same %d messages until it succeeds, "
                              "acknowledging nothing meanwhile", type(exc).__name__, exc, len(taken))
                if deadline is not None and time.monotonic() > deadline:
                    log.error("giving up at shutdown; %d messages stay unacknowledged and will be redelivered",
                              len(taken))
                    return False
                time.sleep(backoff.next())
        if failures:
            log.info("store write succeeded again after %d failed attempts", failures)
        for letter in turned_away:
            self._count(letter)
        c = self.counters
        c.last_commit_ms = round((time.monotonic() - started) * 1000, 3)
        c.last_commit_at = iso(time.time())
        c.batches += 1
        c.ignored += ignored
        c.stored += len(taken) - len(batch.rejected) - ignored - len(turned_away)
        self._ack(taken)
        log.debug("committed a batch of %d in %.1f ms", len(taken), c.last_commit_ms)
        return True

    def _write(self, batch: Batch) -> list[RejectedRecord]:
        """Write `batch`, returning the dead letters made of it. A batch the store refuses for a
        value it cannot hold (StoreWriter.refuses: a retry cannot help) is split until the messages at
        fault are found; each becomes a dead letter (store_refused, with the store's error) and the
        rest is written. Anything else the store raises is raised: the caller retries it all."""
        try:
            return self.store.write(batch)
        except Exception as exc:
            if not self.store.refuses(exc):
                raise
            items: list[Any] = [*batch.requests, *batch.responses, *batch.statuses, *batch.rejected]
            if len(items) > 1:
                half = len(items) // 2
                return self._write(_batch_of(items[:half])) + self._write(_batch_of(items[half:]))
            letter = _store_refused(items[0], exc)
            log.warning("the store refused a message on %s (%s: %s); it goes to the rejected table",
                        letter.topic, type(exc).__name__, str(exc)[:200])
            self.store.write(Batch(rejected=[letter]))
            return [letter]

    def _ack(self, taken: list[Received]) -> None:
        client = self.link.client
        for r in taken:
            # paho drops packets queued while disconnected, so acking then is harmless
            if r.qos > 0 and r.generation == self._generation:
                client.ack(r.mid, r.qos)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.pcfg.sweep_interval_s
        self._sweeps += 1
        try:
            expired = self.store.expire_pending(time.time(), self.pcfg.expire_grace_s)
            self.counters.expired += expired
            if expired:
                log.debug("marked %d pending requests expired", expired)
            if self._sweeps % PURGE_EVERY_SWEEPS == 1:
                purged = self.store.purge(time.time())
                self.counters.purged += purged
                if purged:
                    log.debug("purged %d requests past retention", purged)
        except Exception as exc:
            if not self._sweep_failing:
                log.warning("expiry sweep failed (%s: %s); trying again every %.1f s", type(exc).__name__, exc,
                            self.pcfg.sweep_interval_s)
            self._sweep_failing = True
            return
        if self._sweep_failing:
            log.info("expiry sweep works again")
        self._sweep_failing = False


__all__ = ["Counters", "Persister", "client_id", "parse_workers"]
