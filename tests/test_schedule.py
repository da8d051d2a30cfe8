"""The controller's schedule on a fake clock: stable spread phases, exactly one request per
agent, type and interval, no burst after a restart, shards, forgetting, and scale."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from fleet_common.messages import Status
from fleet_controller.schedule import Schedule, Shard, phase_ms

T0 = 1_800_000_000.0  # a multiple of every interval below, so intervals line up with the clock
TICK_S = 0.5
SCHEDULE = {"cpu": 60, "ping": 30}


def birth(agent_id: str, types: Iterable[str] = ("cpu", "ping", "disk")) -> Status:
    return Status(agent_id=agent_id, online=True, types=list(types))


def death(agent_id: str) -> Status:
    return Status(agent_id=agent_id, online=False)


def fleet(n: int, start_s: float = T0, shard: Shard | None = None, offline_forget_s: float = 86400) -> Schedule:
    """A schedule that learnt `n` agents from retained statuses at start-up."""
    schedule = Schedule(SCHEDULE, start_s=start_s, shard=shard or Shard(), offline_forget_s=offline_forget_s)
    for i in range(n):
        schedule.observe(birth(f"host-{i}"), start_s, live=False)
    return schedule


def run(schedule: Schedule, start_s: float, end_s: float, tick_s: float = TICK_S) -> list[list[tuple[str, str]]]:
    """Tick from just after start_s up to and including end_s; the requests of each tick."""
    ticks = []
    steps = round((end_s - start_s) / tick_s)
    for k in range(1, steps + 1):
        ticks.append(schedule.due(start_s + k * tick_s))
    return ticks


def flat(ticks: Iterable[list[tuple[str, str]]]) -> Counter[tuple[str, str]]:
    return Counter(pair for tick in ticks for pair in tick)


def test_phases_are_stable_across_instances() -> None:
    """Two schedules built apart (as after a restart) put every agent at the same instants."""
    a, b = fleet(500), fleet(500, start_s=T0 + 7.3)
    assert phase_ms("web-01", "cpu", 60) == phase_ms("web-01", "cpu", 60)
    assert set(a.wheels) == {(t, s) for t, s in SCHEDULE.items()}
    for key, wheel in a.wheels.items():
        assert wheel.buckets == b.wheels[key].buckets


def test_requests_spread_evenly_over_the_interval() -> None:
    """10,000 agents: no tick carries more than 1.5x the average load (no thundering herd)."""
    schedule = fleet(10_000)
    ticks = run(schedule, T0, T0 + 60)
    average = 10_000 * sum(TICK_S / s for s in SCHEDULE.values())
    assert max(len(t) for t in ticks) <= 1.5 * average
    assert min(len(t) for t in ticks) >= 0.5 * average


def test_every_agent_once_per_type_per_interval() -> None:
    """Over several intervals each agent gets exactly one request per type per interval."""
    schedule = fleet(2_000)
    counts: dict[str, Counter[tuple[str, str]]] = {}
    for k in range(3):  # three cpu intervals, six ping intervals
        start = T0 + 60 * k
        counts[str(k)] = flat(run(schedule, start, start + 60))
    for c in counts.values():
        assert set(c.values()) == {1, 2}
        assert all(n == 1 for (_, t), n in c.items() if t == "cpu")
        assert all(n == 2 for (_, t), n in c.items() if t == "ping")
        assert len(c) == 2 * 2_000


def test_only_advertised_types_in_schedule_are_asked() -> None:
    """An agent is asked only for types it advertises that the schedule also has."""
    schedule = Schedule(SCHEDULE, start_s=T0)
    schedule.observe(birth("a", ["cpu", "disk"]), T0, live=False)
    schedule.observe(birth("b", []), T0, live=False)
    sent = flat(run(schedule, T0, T0 + 120))
    assert sent == Counter({("a", "cpu"): 2})


def test_restart_mid_interval_sends_no_burst_and_no_duplicates() -> None:
    """A controller restarted mid-interval sends only what falls due after it starts."""
    first = fleet(3_000)
    restart = T0 + 25.0
    before = run(first, T0, restart)
    second = fleet(3_000, start_s=restart)
    after = run(second, restart, T0 + 60)
    average = 3_000 * sum(TICK_S / s for s in SCHEDULE.values())
    assert len(after[0]) <= 1.5 * average  # no catch-up burst in the first tick
    combined = flat(before) + flat(after)
    assert all(n == 1 for (_, t), n in combined.items() if t == "cpu")
    assert all(n == 2 for (_, t), n in combined.items() if t == "ping")
    assert len(combined) == 2 * 3_000


def test_missed_ticks_dispatch_what_was_due_once() -> None:
    """A pause of several ticks, or of more than an interval, asks each pair due exactly once."""
    schedule = fleet(1_000)
    late = schedule.due(T0 + 10)  # 20 ticks missed
    assert len(late) == len(set(late))
    everything = schedule.due(T0 + 10 + 500)  # longer than every interval
    assert sorted(everything) == sorted({(f"host-{i}", t) for i in range(1_000) for t in SCHEDULE})


def test_shards_partition_the_fleet() -> None:
    """Shards 0/2 and 1/2 together ask every agent exactly once per type per interval."""
    shards = [fleet(4_000, shard=Shard(i, 2)) for i in range(2)]
    assert shards[0].known + shards[1].known == 4_000
    assert 0.4 < shards[0].known / 4_000 < 0.6
    combined = flat(run(shards[0], T0, T0 + 60)) + flat(run(shards[1], T0, T0 + 60))
    assert len(combined) == 2 * 4_000
    assert all(n == (1 if t == "cpu" else 2) for (_, t), n in combined.items())


def test_offline_agents_are_asked_until_forgotten() -> None:
    """An offline agent keeps being asked until offline_forget_s has passed, then is dropped."""
    schedule = fleet(10, offline_forget_s=100)
    schedule.observe(death("host-3"), T0, live=True)
    assert (schedule.known, schedule.online) == (10, 9)
    asked = flat(run(schedule, T0, T0 + 60))
    assert asked[("host-3", "cpu")] == 1
    later = flat(run(schedule, T0 + 100, T0 + 220))
    assert ("host-3", "cpu") not in later and ("host-4", "cpu") in later
    assert (schedule.known, schedule.online) == (9, 9)


def test_agent_back_online_is_not_forgotten() -> None:
    """An agent that returns before offline_forget_s stays scheduled after the deadline."""
    schedule = fleet(2, offline_forget_s=50)
    schedule.observe(death("host-0"), T0, live=True)
    schedule.observe(birth("host-0"), T0 + 10, live=True)
    asked = flat(run(schedule, T0, T0 + 120))
    assert asked[("host-0", "cpu")] == 2 and asked[("host-0", "ping")] == 4
    assert schedule.known == 2 and schedule.online == 2


def test_a_live_birth_of_an_agent_not_online_asks_everything_once() -> None:
    """A live birth from an agent that was not online (unseen, or last seen offline, e.g. from a
    retained status of an earlier run) asks all its types; retained statuses and reconnects of
    agents already online do not."""
    schedule = fleet(1)
    assert schedule.observe(birth("new", ["ping", "cpu", "disk"]), T0, live=True) == ["cpu", "ping"]
    assert schedule.observe(birth("new"), T0 + 1, live=True) == []  # a reconnect, no Last Will between
    assert schedule.observe(birth("host-0"), T0 + 1, live=True) == []  # online from retained
    assert schedule.observe(birth("old"), T0 + 1, live=False) == []  # retained, at start-up
    schedule.observe(Status(agent_id="back", online=False), T0 + 1, live=False)  # retained offline
    assert schedule.observe(birth("back"), T0 + 2, live=True) == ["cpu", "ping"]  # it starts again
    schedule.observe(Status(agent_id="new", online=False), T0 + 3, live=True)  # its Last Will
    assert schedule.observe(birth("new"), T0 + 4, live=True) == ["cpu", "ping"]


def test_hundred_thousand_agents() -> None:
    """100,000 agents can be added and ticked through an interval in a few seconds."""
    began = time.perf_counter()
    schedule = fleet(100_000)
    sent = sum(len(t) for t in run(schedule, T0, T0 + 60))
    assert sent == 100_000 + 2 * 100_000
    assert time.perf_counter() - began < 20
