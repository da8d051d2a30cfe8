"""The dispatch budget: at most `budget_per_s` requests leave the controller in any second.

Two kinds of request compete for it. Requests that fall due on the steady schedule go first,
in the order they fell due: their phases are the spread that keeps the fleet flat, and a
budget that suffices for the schedule leaves them exactly on time. The first round of an
agent that comes online (every type it advertises, asked at once so that a new host shows
data within seconds) takes only what is left: its types one FIRST_ROUND_GAP_S apart, and
many agents coming online together one type each in turn. So 10,000 agents starting at once
are 70,000 requests spread over tens of seconds instead of one, and the broker never holds
more than a budget's worth of them and their answers.

What the budget cannot send this tick waits for the next; a request that waits so long that
the same pair falls due again is sent once. Like schedule.py this module is pure: callers
pass the time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from .schedule import Due

FIRST_ROUND_GAP_S = 0.1
# The first round's order: the cheapest answers first, so a new host shows up at once.
FIRST_ROUND_ORDER = ("ping", "cpu", "memory", "network", "disk", "os_info", "processes")


def first_round_order(types: Iterable[str]) -> list[str]:
    rank = {t: i for i, t in enumerate(FIRST_ROUND_ORDER)}
    return sorted(types, key=lambda t: (rank.get(t, len(rank)), t))


@dataclass
class PacerStats:
    sent: int = 0
    deferred: int = 0  # steady requests that waited for a later tick
    coalesced: int = 0  # waited so long that the pair fell due again: sent once
    first_round: int = 0


@dataclass
class Pacer:
    """Each take may send `budget_per_s` times the time since the previous one (up to a second:
    a tick that ran late is made up for, one tick's unused share is not saved up), and a window
    over the last second makes sure no second sends more than the budget, whatever the ticks do."""

    budget_per_s: float
    tick_s: float = 0.5
    stats: PacerStats = field(default_factory=PacerStats)

    def __post_init__(self) -> None:
        if self.budget_per_s <= 0:
            raise ValueError("the dispatch budget must be positive")
        self._tokens = 0.0
        self._refilled_at: float = -1.0
        self._due: OrderedDict[Due, None] = OrderedDict()  # steady requests waiting, oldest first
        self._first: list[tuple[float, int, str, str]] = []  # heap of (ready at, seq, agent, type)
        self._seq = itertools.count()
        self._recent: list[tuple[float, int]] = []  # (when, how many) sent in the last second


    def waiting(self) -> dict[str, int]:
        return {"due": len(self._due), "first_round": len(self._first)}

    def add_due(self, due: Iterable[Due]) -> None:
        for pair in due:
            if pair in self._due:
                self.stats.coalesced += 1
            else:
                self._due[pair] = None

    def add_first_round(self, agent_id: str, types: Iterable[str], now_s: float) -> None:
        for k, type_ in enumerate(first_round_order(types)):
            heapq.heappush(self._first, (now_s + k * FIRST_ROUND_GAP_S, next(self._seq), agent_id, type_))

    def skip_due(self) -> int:
        """Forget the steady requests waiting (the link is down: each pair is due again within
        one interval anyway); return how many."""
        n = len(self._due)
        self._due.clear()
        return n

    def take(self, now_s: float) -> list[Due]:
        """What to send now: waiting steady requests first, then first-round ones whose time has
        come, as far as the budget allows. Steady requests left over count as deferred."""
        self._refill(now_s)
        self._tokens = min(self._tokens, self.budget_per_s - self.rate_per_s(now_s))
        out: list[Due] = []
        while self._due and self._tokens >= 1:
            pair, _ = self._due.popitem(last=False)
            out.append(pair)
            self._tokens -= 1
        self.stats.deferred += len(self._due)
        while self._first and self._first[0][0] <= now_s and self._tokens >= 1:
            _, _, agent_id, type_ = heapq.heappop(self._first)
            out.append((agent_id, type_))
            self._tokens -= 1
            self.stats.first_round += 1
        self.stats.sent += len(out)
        if out:
            self._recent.append((now_s, len(out)))
        return out

    def put_back(self, pairs: list[Due]) -> None:
        """Requests taken but not sent (the broker's window was full): first in line next time,
        and not counted as sent."""
        for pair in reversed(pairs):
            self._due[pair] = None
            self._due.move_to_end(pair, last=False)
        self.stats.sent -= len(pairs)
        if self._recent and pairs:
            when, n = self._recent[-1]
            self._recent[-1] = (when, max(0, n - len(pairs)))

    def rate_per_s(self, now_s: float) -> int:
        """Requests handed out in the last second."""
        self._recent = [(t, n) for t, n in self._recent if t > now_s - 1.0]
        return sum(n for _, n in self._recent)

    def _refill(self, now_s: float) -> None:
        elapsed = self.tick_s if self._refilled_at < 0 else max(0.0, now_s - self._refilled_at)
        self._tokens = max(1.0, min(elapsed, 1.0) * self.budget_per_s)
        self._refilled_at = now_s


__all__ = ["FIRST_ROUND_GAP_S", "Pacer", "PacerStats", "first_round_order"]
