"""Who is due for which request type, and when: a timing wheel per (type, interval) over stable phases.

Every (agent, type) pair has a phase inside the interval in force for it, derived from a
stable hash of its names and that interval, as Prometheus spreads its scrapes. Due times are
`k * interval + phase` on the wall clock, so a restarted controller, or another shard,
computes exactly the same instants and resumes without a burst. Phases are grouped into
slots of `slot_ms`; a tick walks only the slots that passed since the previous tick, so
its cost grows with the agents due, not with the fleet.

Groups (groups.py) give agents with some labels other intervals: there is one wheel per
(type, interval) in force, so an agent whose interval is unchanged, by a reload or a new
birth, stays in its slot and is asked neither twice nor late.

This module is pure: no MQTT, no threads, no clock of its own. Callers pass `now_s`.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from fleet_common.config import GroupConfig
from fleet_common.config import Shard as Shard  # re-exported: fleet_controller.Shard
from fleet_common.messages import Status

from .groups import NO_LABELS, LabelKey, Plan, Planner, Rules

SLOT_MS = 100

Due = tuple[str, str]  # (agent_id, type)


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and release (unlike the salted hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def phase_ms(agent_id: str, type_: str, interval_s: int) -> int:
    """Offset of this agent's requests of `type_` inside each interval, in milliseconds."""
    return stable_hash(f"{agent_id}/{type_}") % (interval_s * 1000)


def shard_of(agent_id: str, count: int) -> int:
    # A different hash input from the phase, so a shard does not own a band of phases.
    return stable_hash(f"shard:{agent_id}") % count


class Wheel:
    """One request type: the agents that take it, bucketed by the slot their phase falls in."""

    def __init__(self, type_: str, interval_s: int, slot_ms: int) -> None:
        self.type, self.interval_s, self.slot_ms = type_, interval_s, slot_ms
        self.slots = interval_s * 1000 // slot_ms
        self.buckets: dict[int, set[str]] = {}

    def slot_of(self, agent_id: str) -> int:
        return phase_ms(agent_id, self.type, self.interval_s) // self.slot_ms

    def add(self, agent_id: str) -> None:
        self.buckets.setdefault(self.slot_of(agent_id), set()).add(agent_id)

    def remove(self, agent_id: str) -> None:
        slot = self.slot_of(agent_id)
        bucket = self.buckets.get(slot)
        if bucket is not None:
            bucket.discard(agent_id)
            if not bucket:
                del self.buckets[slot]

    def due(self, first: int, last: int) -> Iterator[str]:
        """Agents whose slot starts in absolute slots first..last, each at most once:
        after a pause longer than the interval everyone was due, and is asked once."""
        if last - first + 1 >= self.slots:
            for bucket in self.buckets.values():
                yield from bucket
            return
        for absolute in range(first, last + 1):
            yield from self.buckets.get(absolute % self.slots, ())


NO_PLAN: Plan = {}


@dataclass(slots=True)
class AgentState:
    advertised: frozenset[str] = frozenset()  # interned: agents of one kind share it
    labels: LabelKey = NO_LABELS  # interned too
    plan: Plan = field(default_factory=lambda: NO_PLAN)  # type -> interval_s asked; shared, never mutated
    online: bool = True
    offline_since_s: float = 0.0


@dataclass(frozen=True)
class Change:
    """What a reload did: agents whose intervals changed, and (agent, type) pairs started,
    stopped or moved to another interval; the rest kept their phases."""

    agents: int = 0
    started: int = 0
    stopped: int = 0
    moved: int = 0


def owns(shard: Shard, agent_id: str) -> bool:
    return shard.count == 1 or shard_of(agent_id, shard.count) == shard.index


@dataclass
class Schedule:
    """The fleet this controller asks, and what falls due in each tick.

    `start_s` is when dispatch starts: what was due before it is not sent, so a restart
    sends no catch-up burst.
    """

    intervals_s: Mapping[str, int]
    start_s: float
    shard: Shard = field(default_factory=Shard)
    offline_forget_s: float = 86400.0
    slot_ms: int = SLOT_MS
    groups: Sequence[GroupConfig] = ()

    def __post_init__(self) -> None:
        if self.slot_ms <= 0 or 1000 % self.slot_ms:
            raise ValueError(f"slot_ms must divide 1000, not {self.slot_ms}")
        self.planner = Planner(Rules(dict(self.intervals_s), tuple(self.groups)))
        self.wheels: dict[tuple[str, int], Wheel] = {}  # (type, interval_s) -> its wheel, made when needed
        self._longest_slots = 1
        self.agents: dict[str, AgentState] = {}
        self.online = 0
        self._forget_at: list[tuple[float, str]] = []  # a heap; entries go stale, checked on pop
        self._last_slot = self._slot(self.start_s)

    def _wheel(self, type_: str, interval_s: int) -> Wheel:
        wheel = self.wheels.get((type_, interval_s))
        if wheel is None:
            wheel = self.wheels[(type_, interval_s)] = Wheel(type_, interval_s, self.slot_ms)
            self._longest_slots = max(w.slots for w in self.wheels.values())
        return wheel

    @property
    def rules(self) -> Rules:
        return self.planner.rules

    def interval_of(self, agent_id: str, type_: str) -> int | None:
        """The interval in force for this agent and type; None if it is not asked for it (any more)."""
        state = self.agents.get(agent_id)
        return None if state is None else state.plan.get(type_)

    def _slot(self, now_s: float) -> int:
        return int(now_s * 1000) // self.slot_ms

    @property
    def known(self) -> int:
        return len(self.agents)

    def is_known(self, agent_id: str) -> bool:
        return agent_id in self.agents

    def observe(self, status: Status, now_s: float, live: bool) -> list[str]:
        """Take in an agent's status; return the types to ask it right away: all of them when a
        live birth comes from an agent that was not online (never seen, or last seen offline),
        so a new or restarted host shows data at once. Retained statuses at start-up and
        reconnects of agents already online (a broker restart sends no Last Will) ask nothing,
        so restarts of the controller or the broker cause no burst."""
        agent_id = status.agent_id
        if not owns(self.shard, agent_id):
            return []
        state = self.agents.get(agent_id)
        if not status.online:
            if state is None:
                state = self.agents[agent_id] = AgentState(online=False)
                self._start_forgetting(agent_id, state, now_s)
            elif state.online:
                state.online = False
                self.online -= 1
                self._start_forgetting(agent_id, state, now_s)
            return []
        comes_online = live and (state is None or not state.online)
        if state is None:
            state = self.agents[agent_id] = AgentState(online=False)
        if not state.online:
            state.online = True
            self.online += 1
        state.advertised = self.planner.intern_types(status.types or ())
        state.labels = self.planner.intern_labels(status.labels)
        self._replan(agent_id, state)  # new labels take effect at once
        return sorted(state.plan) if comes_online else []

    def _start_forgetting(self, agent_id: str, state: AgentState, now_s: float) -> None:
        # An offline agent keeps its schedule (its persistent session queues the requests)
        # until it has been away offline_forget_s. Its Last Will's ts is when it connected,
        # not when it left, so the count starts when we hear of it.
        state.offline_since_s = now_s
        heapq.heappush(self._forget_at, (now_s + self.offline_forget_s, agent_id))

    def _replan(self, agent_id: str, state: AgentState) -> Change:
        """Move the agent to the wheels its types and labels call for; a pair whose interval
        stays the same is not touched (same wheel, same slot)."""
        old, new = state.plan, self.planner.plan(state.advertised, state.labels)
        if new is old:
            return Change()
        started = stopped = moved = 0
        for type_, interval_s in old.items():
            if new.get(type_) != interval_s:
                self.wheels[(type_, interval_s)].remove(agent_id)
                stopped += type_ not in new
        for type_, interval_s in new.items():
            if old.get(type_) != interval_s:
                self._wheel(type_, interval_s).add(agent_id)
                moved += type_ in old
                started += type_ not in old
        state.plan = new
        return Change(int(bool(started or stopped or moved)), started, stopped, moved)

    def replace_rules(self, intervals_s: Mapping[str, int], groups: Sequence[GroupConfig] = ()) -> Change:
        """Apply a new schedule and groups to every agent known (a reload). Pairs whose interval
        is unchanged keep their phase; the others start at their new phase, with nothing sent
        at once, so a reload causes no burst. Wheels left empty are dropped."""
        self.intervals_s = dict(intervals_s)
        self.groups = tuple(groups)
        self.planner.replace_rules(Rules(self.intervals_s, self.groups))
        total = Change()
        for agent_id, state in self.agents.items():
            change = self._replan(agent_id, state)
            if change.agents:
                total = Change(total.agents + 1, total.started + change.started, total.stopped + change.stopped,
                               total.moved + change.moved)
        for key in [k for k, w in self.wheels.items() if not w.buckets]:
            del self.wheels[key]
        self._longest_slots = max((w.slots for w in self.wheels.values()), default=1)
        return total

    def forget(self, agent_id: str) -> None:
        state = self.agents.pop(agent_id, None)
        if state is None:
            return
        for type_, interval_s in state.plan.items():
            self.wheels[(type_, interval_s)].remove(agent_id)
        if state.online:
            self.online -= 1

    def _forget_offline(self, now_s: float) -> list[str]:
        forgotten = []
        while self._forget_at and self._forget_at[0][0] <= now_s:
            _, agent_id = heapq.heappop(self._forget_at)
            state = self.agents.get(agent_id)
            if state is not None and not state.online and \
                    state.offline_since_s + self.offline_forget_s <= now_s:
                self.forget(agent_id)
                forgotten.append(agent_id)
        return forgotten

    def due(self, now_s: float) -> list[Due]:
        """Everything that fell due in (previous call, now_s], each pair at most once."""
        self._forget_offline(now_s)
        current = self._slot(now_s)
        if current <= self._last_slot:
            if self._last_slot - current > self._longest_slots:
                self._last_slot = current  # the clock jumped far back: start afresh, not stall
            return []  # a small step back waits, so nothing is asked twice
        first, self._last_slot = self._last_slot + 1, current
        return [(agent_id, wheel.type) for wheel in self.wheels.values() for agent_id in wheel.due(first, current)]
