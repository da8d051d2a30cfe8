"""Who is due for which request type, and when: a timing wheel per type over stable phases.

Every (agent, type) pair has a phase inside the type's interval, derived from a stable
hash of its names, as Prometheus spreads its scrapes. Due times are
`k * interval + phase` on the wall clock, so a restarted controller, or another shard,
computes exactly the same instants and resumes without a burst. Phases are grouped into
slots of `slot_ms`; a tick walks only the slots that passed since the previous tick, so
its cost grows with the agents due, not with the fleet.

This module is pure: no MQTT, no threads, no clock of its own. Callers pass `now_s`.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from fleet_common.config import Shard as Shard  # re-exported: fleet_controller.Shard
from fleet_common.messages import Status

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


@dataclass
class AgentState:
    types: frozenset[str] = frozenset()
    online: bool = True
    offline_since_s: float = 0.0


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

    def __post_init__(self) -> None:
        if self.slot_ms <= 0 or 1000 % self.slot_ms:
            raise ValueError(f"slot_ms must divide 1000, not {self.slot_ms}")
        self.wheels = {t: Wheel(t, i, self.slot_ms) for t, i in self.intervals_s.items()}
        self.agents: dict[str, AgentState] = {}
        self.online = 0
        self._forget_at: list[tuple[float, str]] = []  # a heap; entries go stale, checked on pop
        self._last_slot = self._slot(self.start_s)
        self._longest_slots = max((w.slots for w in self.wheels.values()), default=1)

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
        self._retype(agent_id, state, frozenset(status.types or ()) & self.wheels.keys())
        return sorted(state.types) if comes_online else []

    def _start_forgetting(self, agent_id: str, state: AgentState, now_s: float) -> None:
        # An offline agent keeps its schedule (its persistent session queues the requests)
        # until it has been away offline_forget_s. Its Last Will's ts is when it connected,
        # not when it left, so the count starts when we hear of it.
        state.offline_since_s = now_s
        heapq.heappush(self._forget_at, (now_s + self.offline_forget_s, agent_id))

    def _retype(self, agent_id: str, state: AgentState, types: frozenset[str]) -> None:
        for type_ in state.types - types:
            self.wheels[type_].remove(agent_id)
        for type_ in types - state.types:
            self.wheels[type_].add(agent_id)
        state.types = types

    def forget(self, agent_id: str) -> None:
        state = self.agents.pop(agent_id, None)
        if state is None:
            return
        for type_ in state.types:
            self.wheels[type_].remove(agent_id)
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
