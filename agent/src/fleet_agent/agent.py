"""The agent: answers requests on <prefix>/<id>/req/<type> with collector readings.

Threads: paho's network thread parses each request and hands it to a bounded pool
of collector workers; a watchdog thread answers `timeout` for any request whose collector
takes longer than agent.collector_timeout_s. Whichever comes first (result or timeout)
answers; the other is dropped. No request can stop the agent.

Every answer goes to the durable outbox first and is published only while connected; a
"courier" thread deletes it from the outbox on PUBACK and (re)sends what is waiting at
start-up, on every (re)connect, and whenever entries are found that were never handed
to paho. So an answer outlives a lost link and a killed agent; resending is safe
because the persister's writes are idempotent.
"""

from __future__ import annotations

import collections
import json
import logging
import platform
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import paho.mqtt.client as mqtt

from fleet_common.config import Config
from fleet_common.errors import ContractError
from fleet_common.link import Link, publish_properties
from fleet_common.messages import (
    MAX_PAYLOAD_BYTES,
    Request,
    Response,
    Status,
    check_document,
    parse_request,
)
from fleet_common.timefmt import is_valid_id
from fleet_common.topics import Topics, check_agent_id, sanitise_agent_id

from . import __version__
from .collectors import PRIMERS, REGISTRY, BadParams, Collector, jsonable
from .outbox import Outbox

log = logging.getLogger("fleet.agent")

MAX_POOL_REPLACEMENTS = 3
COURIER_CHECK_S = 2.0  # how often the courier looks for entries never handed to paho
ACK_LINGER_S = 0.5  # acknowledged answers leave the outbox in batches this far apart (sooner when stopping)
RESEND_CHUNK = 200
_REPLAY = -1  # courier queue markers; PUBACK mids are positive
_STOP = -2


class _Job:
    """One accepted request on its way to an answer; answered exactly once."""

    __slots__ = ("answered", "correlation", "lock", "reply_to", "req", "started")

    def __init__(self, req: Request, reply_to: str, correlation: Optional[bytes]) -> None:
        self.req, self.reply_to, self.correlation = req, reply_to, correlation
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.answered = False

    def claim(self) -> bool:
        with self.lock:
            if self.answered:
                return False
            self.answered = True
            return True

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


class _Watchdog:
    """Calls on_timeout(job) for every job still unanswered timeout_s after it was watched, from
    one thread for all jobs (a threading.Timer per request started a thread per request).

    Every job has the same timeout, so deadlines come in the order jobs are watched: a queue, not
    a heap. The thread sleeps until the oldest job's deadline; there it takes the unanswered jobs
    that are due and forgets every answered one, so it wakes about twice per timeout_s however
    many requests come, instead of once per request. Each wake-up is two context switches, and on
    a virtual machine those cost the agent more CPU than most of its collectors."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[_Job], None]) -> None:
        self.timeout_s, self._on_timeout = timeout_s, on_timeout
        self._jobs: Deque[Tuple[float, _Job]] = collections.deque()
        self._cond = threading.Condition()
        self._idle = True  # waiting with no deadline: a new job must wake it
        self._stopped = False
        self.wakeups = 0
        self._thread = threading.Thread(target=self._run, name="collector-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, job: _Job) -> None:
        with self._cond:
            self._jobs.append((time.monotonic() + self.timeout_s, job))
            if self._idle:
                self._idle = False
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _due(self, now: float) -> List[_Job]:
        """At a deadline: the unanswered jobs past theirs; answered jobs are forgotten. Caller holds _cond."""
        due: List[_Job] = []
        if self._jobs and self._jobs[0][0] <= now:
            kept: Deque[Tuple[float, _Job]] = collections.deque()
            for deadline, job in self._jobs:
                if job.answered:
                    continue
                if deadline <= now:
                    due.append(job)
                else:
                    kept.append((deadline, job))
            self._jobs = kept
        return due

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._due(time.monotonic())
                while not due and not self._stopped:
                    self._idle = not self._jobs
                    self._cond.wait(self._jobs[0][0] - time.monotonic() if self._jobs else None)
                    self.wakeups += 1
                    due = self._due(time.monotonic())
                if self._stopped:
                    return
            for job in due:
                if job.answered:
                    continue
                try:
                    self._on_timeout(job)
                except Exception:  # the watchdog must outlive one failed answer
                    log.exception("answering a timed-out %s request failed", job.req.type)


class Agent:
    """A fleet agent for one host.

    Agent(cfg, agent_id=None, collectors=None)
      cfg         fleet_common Config (mqtt.*, agent.*)
      agent_id    overrides cfg.agent.id (default: the sanitised host name)
      collectors  request type -> collector (default: the global registry, built-ins included)

    start() connects in the background and returns; stop() says goodbye (offline
    status) and disconnects; run(stop_event) does both around waiting for the event.
    """

    def __init__(self, cfg: Config, agent_id: Optional[str] = None,
                 collectors: Optional[Dict[str, Collector]] = None) -> None:
        self.cfg = cfg
        self.id = check_agent_id(agent_id or cfg.agent.id or sanitise_agent_id())
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.collectors: Dict[str, Collector] = REGISTRY if collectors is None else collectors
        self.timeout_s = float(cfg.agent.collector_timeout_s) or 10.0
        self.workers = max(1, int(cfg.agent.workers))
        self.stats: Dict[str, int] = {"received": 0, "answered": 0, "ok": 0, "errors": 0, "timeouts": 0,
                                      "dropped": 0}
        self._stats_lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._watchdog = _Watchdog(self.timeout_s, self._on_timeout)
        self._stopping = threading.Event()
        self._active: Dict[int, float] = {}  # running collectors: id(job) -> monotonic start
        self._replaced = 0
        self._health: Dict[str, str] = {}  # type -> last outcome, to log changes only
        self._status_topic = self.topics.status(self.id)
        will = (self._status_topic, self._offline().payload())
        self.link = Link(cfg.mqtt, self.id, clean_start=False, session_expiry_s=cfg.agent.session_expiry_s,
                         will=will, username=cfg.mqtt.username or self.id, logger=logging.getLogger("fleet.link"))
        self.link.on_connect_hooks.append(self._on_connect)
        self.link.client.on_message = self._on_message
        self.link.client.on_publish = self._on_publish
        self.outbox = Outbox(cfg.agent.outbox_path, cfg.agent.outbox_max_messages)
        # _send_lock makes "stored in the outbox, handed to paho, mid recorded" one step, so a
        # PUBACK (seen by the courier, never on the network thread) always finds its mid.
        self._send_lock = threading.Lock()
        self._inflight: Dict[int, int] = {}  # paho mid -> outbox seq
        self._handed: Set[int] = set()  # outbox seqs paho holds (it resends them after a reconnect)
        self._courier_q: queue.Queue[int] = queue.Queue()
        self._courier: Optional[threading.Thread] = None
        self._reported_drops = self.outbox.dropped

    # ----------------------------------------------------------------- lifecycle
    @property
    def types(self) -> List[str]:
        return sorted(self.collectors)

    def start(self) -> Agent:
        """Prime the collectors, start the workers and connect (in the background; retries forever)."""
        for name in self.types:
            primer = PRIMERS.get(name)
            if primer is not None and self.collectors[name] is REGISTRY.get(name):
                try:
                    primer()
                except Exception as exc:  # priming is an optimisation
                    log.debug("priming %s failed: %s", name, exc)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="collector")
        self._watchdog.start()
        self._courier = threading.Thread(target=self._courier_loop, name="outbox-courier", daemon=True)
        self._courier.start()
        if self.outbox.queued or self.outbox.dropped:
            log.info("outbox %s: %d answers waiting from before, %d dropped so far", self.outbox.path,
                     self.outbox.queued, self.outbox.dropped)
        log.info("agent %r starting: broker %s, topic prefix %r, %d types (%s)", self.id, self.link.where,
                 self.topics.prefix, len(self.types), ", ".join(self.types))
        self.link.start()
        return self

    def wait_connected(self, timeout_s: Optional[float] = None) -> bool:
        return self.link.wait_connected(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Let running collectors answer (briefly), publish the offline status, disconnect."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + min(2.0, timeout_s / 2)
        while (self.busy or self._handed) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.link.stop(before_disconnect=lambda: self._publish_status(self._offline(), wait_s=timeout_s / 2))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._watchdog.stop()
        if self._courier is not None:
            self._courier_q.put(_STOP)
            self._courier.join(5)
        counts = self.outbox.counts()
        log.info("agent %r stopped (%s; outbox: %d waiting for the next start, %d dropped)", self.id,
                 ", ".join(f"{k} {v}" for k, v in self.stats.items()), counts["queued"], counts["dropped"])
        with self._send_lock:
            self.outbox.close()

    def run(self, stop_event: threading.Event) -> int:
        """Serve until stop_event is set (e.g. by SIGTERM), then stop cleanly; returns the exit code."""
        self.start()
        try:
            stop_event.wait()
        finally:
            log.info("agent %r stopping", self.id)
            self.stop()
        return 0

    @property
    def busy(self) -> int:
        """Number of collectors still running (a hung one keeps counting)."""
        with self._stats_lock:
            return len(self._active)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------- status
    def _offline(self) -> Status:
        return Status(agent_id=self.id, online=False)

    def _birth(self) -> Status:
        return Status(agent_id=self.id, online=True, hostname=socket.gethostname(), platform=platform.platform(),
                      agent_version=__version__, types=self.types, extra=self.health())

    def health(self) -> Dict[str, Any]:
        """The agent's own counters: in its status message (it serves no metrics) and its heartbeat."""
        with self._stats_lock:
            counters = dict(self.stats)
        return {"outbox": self.outbox.counts(), "counters": counters}

    def _publish_status(self, status: Status, wait_s: float = 0.0) -> None:
        info = self.link.publish(self._status_topic, status.payload(), qos=1, retain=True)
        if wait_s > 0:
            try:
                info.wait_for_publish(wait_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed by the broker: %s", exc)

    def _on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(self.topics.agent_requests(self.id), qos=1)
        self._publish_status(self._birth())
        self._courier_q.put(_REPLAY)
        log.debug("subscribed to %s and published birth status", self.topics.agent_requests(self.id))

    # ----------------------------------------------------------------- requests
    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, bytes(msg.payload), msg.properties)
        except Exception:  # the agent never dies of a request
            self._count("dropped")
            log.exception("unexpected error handling a message on %r", msg.topic[:200])

    def handle(self, topic: str, payload: bytes, properties: Any = None) -> None:
        """Answer one request message (called on paho's network thread)."""
        self._count("received")
        reply_to = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        try:
            parsed = self.topics.parse(topic)
        except ContractError as exc:
            self._drop(topic, f"bad topic: {exc}")
            return
        if parsed.kind != "req" or parsed.agent_id != self.id or parsed.type is None:
            self._drop(topic, "not a request for this agent")
            return
        type_ = parsed.type
        try:
            req = parse_request(payload, parsed)
        except ContractError as exc:
            req_id = _recover_id(payload, correlation)
            if req_id is None:
                self._drop(topic, f"bad request without a usable id: {exc}")
                return
            job = _Job(Request(id=req_id, type=type_), self.topics.reply(self.id, type_, reply_to), correlation)
            self._answer(job, Response.fail(req_id, self.id, type_, "bad_request", str(exc)))
            return
        job = _Job(req, self.topics.reply(self.id, type_, reply_to), correlation)
        if self._stopping.is_set():
            self._drop(topic, "agent is stopping")
            return
        if req.is_expired(time.time()):
            self._answer(job, Response.fail(req.id, self.id, type_, "expired",
                                            f"request expired at {req.expires_at}"))
            return
        collector = self.collectors.get(type_)
        if collector is None:
            self._answer(job, Response.fail(req.id, self.id, type_, "unknown_type",
                                            f"this agent answers {', '.join(self.types)}"))
            return
        self._submit(job, collector)

    def _drop(self, topic: str, why: str) -> None:
        self._count("dropped")
        log.debug("dropped a message on %r: %s", topic[:200], why)

    def stuck(self) -> int:
        """Collectors still running past their timeout (hung, e.g. on a dead network mount)."""
        limit = time.monotonic() - self.timeout_s
        with self._stats_lock:
            return sum(1 for started in self._active.values() if started < limit)

    def _submit(self, job: _Job, collector: Collector) -> None:
        pool = self._pool
        if pool is None:
            raise RuntimeError("agent not started")
        if self.stuck() >= self.workers and self._replaced < MAX_POOL_REPLACEMENTS:
            # Python cannot kill a thread: leave the hung ones behind and carry on with new workers
            self._replaced += 1
            log.warning("all %d collector workers are stuck past their timeout; starting new ones (%d/%d)",
                        self.workers, self._replaced, MAX_POOL_REPLACEMENTS)
            pool.shutdown(wait=False)
            self._pool = pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="collector")
        try:
            pool.submit(self._collect, job, collector)
        except RuntimeError as exc:  # the pool was shut down: the agent is stopping
            job.claim()  # so the watchdog does not answer it either
            self._drop(job.reply_to, str(exc))
            return
        self._watchdog.watch(job)

    def _collect(self, job: _Job, collector: Collector) -> None:
        if job.answered:  # it timed out while waiting for a worker
            return
        key = id(job)
        started = time.monotonic()
        with self._stats_lock:
            self._active[key] = started
        type_ = job.req.type
        try:
            try:
                data = collector(dict(job.req.params))
                if not isinstance(data, dict):
                    raise TypeError(f"collector returned {type(data).__name__}, not an object")
                data = jsonable(data)  # JSON types only, so the answer always encodes
                check_document(data)
                response = Response.ok(job.req.id, self.id, type_, data, (time.monotonic() - started) * 1000.0)
            except BadParams as exc:
                response = Response.fail(job.req.id, self.id, type_, "bad_request", str(exc)[:1000],
                                         duration_ms=_ms(started))
            except ContractError as exc:
                response = Response.fail(job.req.id, self.id, type_, "collector_failed",
                                         f"result breaks the contract: {exc}"[:1000], duration_ms=_ms(started))
            except Exception as exc:  # a failing collector is an answer, not a crash
                message = str(exc) or type(exc).__name__
                response = Response.fail(job.req.id, self.id, type_, "collector_failed", message[:1000],
                                         duration_ms=_ms(started))
            if not self._answer(job, response):
                log.debug("%s request %s finished after its timeout; result discarded", type_, job.req.id)
        finally:
            with self._stats_lock:
                self._active.pop(key, None)

    def _on_timeout(self, job: _Job) -> None:
        self._answer(job, Response.fail(job.req.id, self.id, job.req.type, "timeout",
                                        f"collector took longer than {self.timeout_s:g} s",
                                        duration_ms=round(job.elapsed_ms(), 3)))

    def _answer(self, job: _Job, response: Response) -> bool:
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
        with self._send_lock:
            seq = self.outbox.put(job.reply_to, payload, job.correlation)
            if self.link.connected.is_set():  # else it waits in the outbox, not in paho's memory
                self._hand_over(seq, job.reply_to, payload, job.correlation)
        code = "ok" if response.status == "ok" else (response.error or {}).get("code", "error")
        with self._stats_lock:
            self.stats["answered"] += 1
            self.stats["ok" if code == "ok" else "errors"] += 1
            if code == "timeout":
                self.stats["timeouts"] += 1
        self._note_health(response.type, code, response)
        log.debug("answered %s request %s on %s: %s (%.1f ms)", response.type, response.id, job.reply_to,
                  code, response.duration_ms or 0.0)
        return True

    # ----------------------------------------------------------------- outbox
    def _hand_over(self, seq: int, topic: str, payload: bytes, correlation: Optional[bytes]) -> None:
        """Publish one outbox entry (caller holds _send_lock). QoS 1: paho keeps it until
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

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho calls this holding its own lock, so only hand the mid to the courier here
        self._courier_q.put(mid)

    def _courier_loop(self) -> None:
        next_check = time.monotonic() + COURIER_CHECK_S
        while True:
            marks: List[int] = []
            try:
                marks.append(self._courier_q.get(timeout=COURIER_CHECK_S))
                if marks[0] > 0:
                    # A PUBACK: let the next ones gather for a moment, then delete them together.
                    # This thread is not waiting on the queue meanwhile, so their puts do not wake
                    # it: at a few answers a second it wakes twice per ACK_LINGER_S, not per answer.
                    self._stopping.wait(ACK_LINGER_S)
                while True:
                    marks.append(self._courier_q.get_nowait())
            except queue.Empty:
                pass
            periodic = time.monotonic() >= next_check
            if periodic:
                next_check = time.monotonic() + COURIER_CHECK_S
            try:
                self._acked([m for m in marks if m > 0])
                if _STOP in marks:
                    return
                if _REPLAY in marks or (periodic and self.outbox.queued > len(self._handed)):
                    self._resend()
                if periodic:
                    self._report_drops()
            except Exception:  # the courier must outlive a failing disk; entries wait for the next round
                log.exception("outbox courier failed; retrying in %.0f s", COURIER_CHECK_S)

    def _acked(self, mids: List[int]) -> None:
        if not mids:
            return
        with self._send_lock:
            seqs = [self._inflight.pop(m) for m in mids if m in self._inflight]
            self._handed.difference_update(seqs)
            self.outbox.delete(seqs)

    def _resend(self) -> None:
        """Hand paho every outbox entry it does not hold yet, in order, while connected."""
        after, sent = 0, 0
        while self.link.wait_connected(5) and not self._stopping.is_set():
            with self._send_lock:
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

    def _report_drops(self) -> None:
        """A changed drop count goes out in a fresh status message, not only in the log."""
        dropped = self.outbox.dropped
        if dropped != self._reported_drops and self.link.connected.is_set():
            self._reported_drops = dropped
            self._publish_status(self._birth())

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


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000.0, 3)


def _recover_id(payload: bytes, correlation: Optional[bytes]) -> Optional[str]:
    """The request id of a malformed request, from its JSON or its CorrelationData, if either holds one."""
    try:
        obj = json.loads(payload.decode("utf-8"))
        if isinstance(obj, dict) and is_valid_id(obj.get("id")):
            return str(obj["id"])
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    if isinstance(correlation, (bytes, bytearray)):
        try:
            text = bytes(correlation).decode("ascii")
        except UnicodeDecodeError:
            return None
        if is_valid_id(text):
            return text
    return None


def run_agent(cfg: Config, stop_event: threading.Event, agent_id: Optional[str] = None) -> Tuple[int, Agent]:
    agent = Agent(cfg, agent_id=agent_id)
    return agent.run(stop_event), agent


__all__ = ["Agent", "run_agent"]
