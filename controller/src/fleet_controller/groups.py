"""Which intervals an agent takes: `controller.schedule`, then every one of `controller.groups`
whose `match` its labels include, in order, a later group winning per type; 0 turns a type off.

Pure, like schedule.py. Many agents share a few label sets, so what an agent takes is worked out
once per (advertised types, labels) and the same read-only mapping is shared by all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fleet_common.config import ControllerConfig, GroupConfig
from fleet_common.labels import matches

Plan = Mapping[str, int]  # type -> interval_s, the types asked only; shared between agents: never mutated
LabelKey = tuple[tuple[str, str], ...]  # labels as a sorted, hashable tuple

NO_LABELS: LabelKey = ()
# Distinct (types, labels) pairs remembered before the cache starts afresh: a fleet has a few,
# a hostile one could invent one per birth.
CACHE_MAX = 4096


def label_key(labels: Mapping[str, str] | None) -> LabelKey:
    return tuple(sorted(labels.items())) if labels else NO_LABELS


@dataclass(frozen=True)
class Rules:
    """The base schedule and the groups over it."""

    schedule: Mapping[str, int]
    groups: Sequence[GroupConfig] = ()

    @classmethod
    def from_config(cls, controller: ControllerConfig) -> Rules:
        return cls(dict(controller.schedule), tuple(controller.groups))

    def intervals_for(self, labels: Mapping[str, str]) -> dict[str, int]:
        """Every type an agent with `labels` is asked for, whatever it advertises, and its interval."""
        out = dict(self.schedule)
        for group in self.groups:
            if matches(labels, group.match):
                out.update(group.schedule)
        return {t: s for t, s in out.items() if s > 0}

    def types(self) -> set[str]:
        """Every type some agent may be asked for."""
        return set(self.schedule).union(*(g.schedule for g in self.groups))

    def describe(self) -> str:
        """One line for the log: 'cpu=60s, ping=60s; role=db: processes=60s, cpu off'."""
        def intervals(schedule: Mapping[str, int]) -> str:
            return ", ".join(f"{t}={s}s" if s else f"{t} off" for t, s in sorted(schedule.items()))
        text = intervals(self.schedule)
        for group in self.groups:
            text += f"; {','.join(f'{k}={v}' for k, v in sorted(group.match.items()))}: {intervals(group.schedule)}"
        return text


@dataclass
class Planner:
    """Rules applied to agents, with the answers shared: plan() of the same types and labels is
    the same object."""

    rules: Rules
    _plans: dict[tuple[frozenset[str], LabelKey], Plan] = field(default_factory=dict)
    _interned: dict[object, object] = field(default_factory=dict)

    def plan(self, types: frozenset[str], labels: LabelKey) -> Plan:
        key = (types, labels)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= CACHE_MAX:
                self._plans.clear()
                self._interned.clear()
            wanted = self.rules.intervals_for(dict(labels))
            plan = self._plans[key] = {t: s for t, s in sorted(wanted.items()) if t in types}
        return plan

    def intern_types(self, types: Iterable[str]) -> frozenset[str]:
        value = frozenset(types)
        return self._interned.setdefault(value, value)  # type: ignore[return-value]

    def intern_labels(self, labels: Mapping[str, str] | None) -> LabelKey:
        value = label_key(labels)
        return self._interned.setdefault(value, value)  # type: ignore[return-value]

    def replace_rules(self, rules: Rules) -> None:
        self.rules = rules
        self._plans.clear()


__all__ = ["CACHE_MAX", "LabelKey", "NO_LABELS", "Plan", "Planner", "Rules", "label_key"]
