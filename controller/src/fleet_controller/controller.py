"""The controller service: learns the fleet from retained status, and on every tick
publishes the requests that fell due (QoS 1, with MQTT 5 ResponseTopic, CorrelationData
and MessageExpiryInterval)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable

import paho.mqtt.client as mqtt
from apscheduler.schedulers.background import BackgroundScheduler

from fleet_common.ask import build_request
from fleet_common.brokerwatch import ADVICE, BrokerWatch
from fleet_common.config import Config, ControllerConfig
from fleet_common.errors import ContractError
from fleet_common.health import Readiness
from fleet_common.link import Link
from fleet_common.messages import parse_status
from fleet_common.timefmt import new_id
from fleet_common.topics import STATUS

from .pacing import Pacer
from .schedule import Change, Schedule

log = logging.getLogger("fleet.controller")

SUMMARY_EVERY_S = 60.0
STATUS_WINDOW = 10000
Clock = Callable[[], float]


def default_client_id(cfg: Config) -> str:
    shard = cfg.controller.shard
    # Unique per process: two controllers of one shard with one id would knock each other off.
    return cfg.controller.client_id or f"fleet-controller-{shard.index}of{shard.count}-{new_id()[-8:]}"


class Controller:
    """Owns the MQTT link, the schedule and the tick job; start() and stop(), or a `with` block."""

    def __init__(self, cfg: Config, clock: Clock = time.time) -> None:
        self.cfg = cfg
        self.topics = cfg.mqtt.topics()
        self.intervals_s = dict(cfg.controller.schedule)
        self._clock = clock
        self._lock = threading.Lock()  # the schedule is fed by the network thread, read by the tick
        self.schedule = Schedule(self.intervals_s, start_s=clock(), shard=cfg.controller.shard,
                                 offline_forget_s=cfg.controller.offline_forget_s, groups=cfg.controller.groups)
        # No in-flight window in paho: with one, every ack walks all the messages in flight
        # (paho 2.2's _update_inflight), which took a quarter of the controller's time at 100,000
        # agents. The bound is on what is unacknowledged instead; past it requests are skipped.
        # ...and below the broker's Receive Maximum (wait_for_room): a broker keeps no more than that
        # in flight from one client and queues the rest, up to its max_queued_messages, then drops.
        # Its own Receive Maximum bounds the statuses in flight to it: 2,000 agents starting or
        # stopping at once are 2,000 statuses, past a stock Mosquitto's 20 in flight and 1000 queued.
        self.link = Link(cfg.mqtt, default_client_id(cfg), logger=logging.getLogger("fleet.controller.link"),
                         max_inflight=0, max_unacked=cfg.controller.max_unacked_requests, count_unacked=True,
                         receive_maximum=STATUS_WINDOW)
        self.broker = BrokerWatch(log, ADVICE)
        self.broker.attach(self.link.client)
        self.ready = Readiness()  # watching agent status: a birth from now on is news to us
        self.link.on_connect_hooks.append(self._subscribe)
        self.link.on_connect_hooks.append(self.broker.subscribe)
        self.link.on_disconnect_hooks.append(self.ready.clear)
        self.link.client.on_subscribe = self._on_subscribe
        self.link.client.on_message = self._on_message
        self.pacer = Pacer(cfg.controller.max_dispatch_per_s, cfg.controller.tick_s)
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="controller-dispatch", daemon=True)
        self._scheduler = BackgroundScheduler(timezone="UTC")
        # counters, for logs now and metrics later
        self.issued: Counter[str] = Counter()
        self.skipped = 0
        self.malformed = 0
        self.came_online = 0
        self._came_online_at_summary = 0
        self._skipping = True  # until the first connection; start-up is not worth a warning
        self._behind = False
        self._summary_at = clock()
        self._issued_at_summary = 0
        self._over_budget_said_at = float("-inf")

    # lifecycle
    def start(self) -> Controller:
        self.link.start()
        self._dispatcher.start()
        self._scheduler.add_job(self.tick, "interval", seconds=self.cfg.controller.tick_s, id="tick",
                                name="controller-tick", coalesce=True, max_instances=1, misfire_grace_time=None)
        self._scheduler.start()
        log.info("controller started: shard %s, schedule %s, tick %.2f s, at most %d requests a second",
                 self.cfg.controller.shard, self.schedule.rules.describe(),
                 self.cfg.controller.tick_s, self.cfg.controller.max_dispatch_per_s)
        return self

    def apply_schedule(self, new: ControllerConfig) -> Change:
        """Take `new`'s schedule and groups (a reload): in force from the next tick, agents whose
        intervals are unchanged keep their phases, and nothing is sent because of it. The other
        controller keys stay as they were started."""
        with self._lock:
            change = self.schedule.replace_rules(new.schedule, new.groups)
            self.intervals_s = dict(new.schedule)
            self.cfg = self.cfg.replace("controller", schedule=dict(new.schedule), groups=list(new.groups))
        return change

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)
        self._stopping.set()
        self._dispatcher.join(5.0)
        self.link.stop()
        log.info("controller stopped: %d requests issued, %d skipped while disconnected",
                 sum(self.issued.values()), self.skipped)

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:  # the network thread may add a type to `issued` meanwhile
            known, online, issued = self.schedule.known, self.schedule.online, dict(self.issued)
            p, waiting = self.pacer.stats, self.pacer.waiting()
            rate = self.pacer.rate_per_s(self._clock())
        return {"agents_known": known, "agents_online": online, "issued": issued,
                "skipped": self.skipped, "malformed_status": self.malformed,
                "connected": self.link.connected.is_set(),
                "dispatch": {"budget_per_s": self.cfg.controller.max_dispatch_per_s, "rate_per_s": rate,
                             "deferred": p.deferred, "coalesced": p.coalesced, "first_round": p.first_round,
                             "waiting_due": waiting["due"], "waiting_first_round": waiting["first_round"]}}

    # the tick (scheduler thread)
    def tick(self) -> None:
        """Hand what fell due since the previous tick to the pacer; the dispatcher sends it."""
        now = self._clock()
        with self._lock:
            due = self.schedule.due(now)
            if not self.link.connected.is_set():
                # Not queued in paho: the next request for each pair is due within one interval anyway.
                self._skip(len(due) + self.pacer.skip_due())
                return
            self.pacer.add_due(due)
            waiting = self.pacer.waiting()["due"]
        self._over_budget(waiting, now)
        self._summarise(now)

    # the dispatcher (its own thread)
    def _dispatch(self) -> None:
        """Send what the pacer lets go, evenly at the budget's rate rather than in a burst per
        tick, and never more unacknowledged than the broker's window."""
        gap_s = 1.0 / self.cfg.controller.max_dispatch_per_s
        while not self._stopping.is_set():
            with self._lock:
                connected = self.link.connected.is_set()
                # an agent forgotten meanwhile is asked nothing, nor one whose type a reload or new labels
                # turned off; an offline one still is (its session queues)
                batch = [(a, t, i) for a, t in self.pacer.take(self._clock())
                         if (i := self.schedule.interval_of(a, t)) is not None] if connected else []
            if not batch:
                self._stopping.wait(0.05)
                continue
            if self._skipping:
                log.info("connected: dispatching requests (%d skipped while disconnected)", self.skipped)
                self._skipping = False
            started = time.monotonic()
            for k, (agent_id, type_, interval_s) in enumerate(batch):
                wait_s = started + k * gap_s - time.monotonic()
                if wait_s > 0.002:  # sleeping is coarse; a couple of ms early is within the budget's second
                    time.sleep(wait_s)
                if self._stopping.is_set() or not self.link.wait_for_room(1.0):
                    with self._lock:
                        self.pacer.put_back([(a, t) for a, t, _ in batch[k:]])
                    if not self._stopping.is_set():
                        self._say_behind()
                    break
                self.send(agent_id, type_, self._clock(), interval_s)

    def _say_behind(self) -> None:
        if not self._behind:
            self._behind = True
            log.warning("the broker has not acknowledged %d requests (its window, or max_unacked_requests); "
                        "requests wait until it catches up", self.link.window())

    def _skip(self, n: int) -> None:
        if not self._skipping:
            log.warning("not connected to the broker: skipping requests until reconnected")
            self._skipping = True
        self.skipped += n

    def _over_budget(self, waiting: int, now: float) -> None:
        """More steady requests than one tick of the budget left waiting: the schedule asks for more
        than controller.max_dispatch_per_s. Said at most once a minute."""
        budget = self.cfg.controller.max_dispatch_per_s
        if waiting <= budget * self.cfg.controller.tick_s or now - self._over_budget_said_at < SUMMARY_EVERY_S:
            return
        self._over_budget_said_at = now
        log.warning("the schedule asks for more than controller.max_dispatch_per_s (%d a second): %d requests "
                    "wait; raise it (and what the persisters can store) or lengthen the intervals", budget, waiting)

    def send(self, agent_id: str, type_: str, now: float, interval_s: int) -> bool:
        # The expiry is the interval, so an offline agent's session holds at most one of each type.
        out = build_request(self.topics, agent_id, type_, interval_s, now_s=now)
        info = self.link.publish(out.topic, out.payload(), qos=1, properties=out.properties)
        # NO_CONN: the link dropped mid-tick; paho keeps this QoS 1 message and sends it on reconnect.
        ok = info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
        with self._lock:  # first rounds are sent from the network thread, the rest from the tick
            if ok:
                self.issued[type_] += 1
            else:
                self.skipped += 1
        if not ok:
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._say_behind()
            return False
        if self._behind:
            self._behind = False
            log.info("the broker caught up: dispatching requests again (%d skipped so far)", self.skipped)
        log.debug("asked %s for %s (request %s)", agent_id, type_, out.request.id)
        return True

    def _summarise(self, now: float) -> None:
        if now - self._summary_at < SUMMARY_EVERY_S:
            return
        total = sum(self.issued.values())
        with self._lock:
            known, online = self.schedule.known, self.schedule.online
        log.info("agents online %d/%d known, %d came online; %d requests issued in the last %.0f s; %d skipped, "
                 "%d malformed statuses so far", online, known, self.came_online - self._came_online_at_summary,
                 total - self._issued_at_summary, now - self._summary_at, self.skipped, self.malformed)
        self._summary_at, self._issued_at_summary = now, total
        self._came_online_at_summary = self.came_online

    # MQTT callbacks (network thread)
    def _subscribe(self, client: mqtt.Client, session_present: bool) -> None:
        # A clean session each time: the retained statuses tell us the fleet again.
        self.ready.clear()
        client.subscribe(self.topics.all_status(), qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid == self.broker.subscribe_mid:
            return
        if any(r.is_failure for r in reasons):
            log.error("broker refused the subscription to %s: %s", self.topics.all_status(), reasons)
        else:
            log.info("watching agent status on %s", self.topics.all_status())
            self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = self._clock()
        try:
            topic = self.topics.parse(msg.topic)
            if topic.kind != STATUS:
                return
            if not msg.payload:  # a cleared retained status: the agent was removed
                with self._lock:
                    self.schedule.forget(topic.agent_id)
                return
            status = parse_status(bytes(msg.payload), topic)
        except ContractError as exc:
            self.malformed += 1
            log.debug("ignored a malformed status on %s: %s", msg.topic, exc)
            return
        with self._lock:
            first_round = self.schedule.observe(status, now, live=not msg.retain)
            if first_round:  # sent by the tick, paced (see pacing.py)
                self.pacer.add_first_round(status.agent_id, first_round, now)
        if first_round:
            self.came_online += 1
            # one line each for the first few a minute; a fleet starting at once is in the summary
            level = logging.INFO if self.came_online - self._came_online_at_summary <= 5 else logging.DEBUG
            log.log(level, "agent %s came online: asking for %s", status.agent_id, ", ".join(first_round))
