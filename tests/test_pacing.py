"""The controller's dispatch budget (fleet_controller.pacing), driven by a simulated clock:
no second sends more than the budget, steady requests keep their time, first rounds take
what is left, spread over an agent's types and over the agents."""

from __future__ import annotations

import random
from collections import defaultdict

from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_controller.pacing import FIRST_ROUND_GAP_S, Pacer, first_round_order

TYPES = ["cpu", "disk", "memory", "network", "os_info", "ping", "processes"]


def run(pacer: Pacer, ticks: int, tick_s: float, due_per_tick: int = 0,
        first_round_at: dict[int, int] | None = None, jitter: float = 0.0,
        seed: int = 1) -> list[tuple[float, str, str]]:
    """Tick `ticks` times; each tick `due_per_tick` steady requests fall due, and at tick k
    `first_round_at[k]` agents come online. Returns (when, agent, type) of everything sent."""
    first_round_at = first_round_at or {}
    rng = random.Random(seed)
    sent, now, fresh = [], 1000.0, 0
    for k in range(ticks):
        now += tick_s + rng.uniform(-jitter, jitter) * tick_s
        pacer.add_due([(f"steady-{k}-{i}", "cpu") for i in range(due_per_tick)])
        for _ in range(first_round_at.get(k, 0)):
            pacer.add_first_round(f"new-{fresh}", TYPES, now)
            fresh += 1
        sent += [(now, a, t) for a, t in pacer.take(now)]
    return sent


def most_in_a_second(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


@settings(max_examples=examples(60), deadline=None)
@given(budget=st.integers(5, 3000), tick_s=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
       due=st.integers(0, 400), joining=st.integers(0, 3000), jitter=st.floats(0, 0.9))
def test_no_second_sends_more_than_the_budget(budget: int, tick_s: float, due: int, joining: int,
                                              jitter: float) -> None:
    """Whatever the ticks (early, late, long), the steady load and the agents coming online, no
    one-second window holds more requests than the budget."""
    pacer = Pacer(budget, tick_s)
    sent = run(pacer, 40, tick_s, due_per_tick=due, first_round_at={0: joining, 7: joining // 2}, jitter=jitter)
    assert most_in_a_second([t for t, _, _ in sent]) <= budget


def test_steady_requests_within_the_budget_leave_the_tick_they_fall_due() -> None:
    """A schedule the budget covers keeps its phases: every steady request goes out at once,
    even while thousands of agents wait for their first round."""
    pacer = Pacer(1000, 0.5)
    sent = run(pacer, 20, 0.5, due_per_tick=300, first_round_at={0: 2000})
    steady_at = {a: t for t, a, _ in sent if a.startswith("steady-")}
    for k in range(20):
        tick_time = 1000.0 + (k + 1) * 0.5
        assert all(abs(steady_at[f"steady-{k}-{i}"] - tick_time) < 1e-9 for i in range(300))
    assert pacer.stats.deferred == 0


def test_the_first_round_takes_what_the_steady_schedule_leaves() -> None:
    """With 300 of a tick's 500 going to the schedule, first rounds get the other 200 a tick."""
    pacer = Pacer(1000, 0.5)
    sent = run(pacer, 10, 0.5, due_per_tick=300, first_round_at={0: 2000})
    per_tick: dict[float, int] = defaultdict(int)
    for t, agent, _ in sent:
        if agent.startswith("new-"):
            per_tick[t] += 1
    assert set(per_tick.values()) == {200}


def test_one_agent_is_asked_one_type_at_a_time_and_many_agents_in_turn() -> None:
    """An agent's types go out FIRST_ROUND_GAP_S apart, the cheap ones first; with many agents
    online at once each gets its first type before any gets its second."""
    pacer = Pacer(5000, 0.05)
    alone = run(pacer, 40, 0.05, first_round_at={0: 1})
    assert [t for _, _, t in alone] == first_round_order(TYPES) == ["ping", "cpu", "memory", "network", "disk",
                                                                     "os_info", "processes"]
    times = [t for t, _, _ in alone]
    assert all(b - a >= FIRST_ROUND_GAP_S - 1e-9 for a, b in zip(times, times[1:]))
    assert times[-1] - times[0] < 1.0, "a lone new agent has all its answers asked for within a second"
    crowd = Pacer(100, 0.5)
    order = [(a, t) for _, a, t in run(crowd, 30, 0.5, first_round_at={0: 50})]
    firsts = [i for i, (_, t) in enumerate(order) if t == "ping"]
    seconds = [i for i, (_, t) in enumerate(order) if t == "cpu"]
    assert max(firsts) < min(seconds)


def test_a_pair_that_waits_until_it_falls_due_again_is_sent_once() -> None:
    """Over the budget, steady requests wait (counted as deferred); one that falls due again
    meanwhile is not sent twice."""
    pacer = Pacer(10, 1.0)
    pacer.add_due([(f"a{i}", "cpu") for i in range(30)])
    first = pacer.take(1.0)
    pacer.add_due([(f"a{i}", "cpu") for i in range(30)])
    assert len(first) == 10 and pacer.stats.coalesced == 20 and pacer.stats.deferred == 20
    later = pacer.take(2.0) + pacer.take(3.0) + pacer.take(4.0) + pacer.take(5.0)
    assert sorted(later) == sorted((f"a{i}", "cpu") for i in range(30)), "each pair once"


def test_a_dropped_link_forgets_the_waiting_steady_requests() -> None:
    """While disconnected the controller skips what falls due (as it did before the budget)."""
    pacer = Pacer(10, 1.0)
    pacer.add_due([(f"a{i}", "cpu") for i in range(30)])
    pacer.take(1.0)
    assert pacer.skip_due() == 20 and pacer.waiting() == {"due": 0, "first_round": 0}
