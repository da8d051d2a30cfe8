"""Per-label schedules (controller.groups) and reloads on a fake clock: groups change intervals,
later groups win, 0 turns a type off, phases depend only on id, type and interval, new labels
take effect at once, and a reload keeps unchanged phases and sends nothing extra."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import yaml

from fleet_common.config import Config, GroupConfig, load_config
from fleet_common.errors import ConfigError
from fleet_common.messages import Status
from fleet_controller.groups import CACHE_MAX, Rules
from fleet_controller.reload import changed_keys
from fleet_controller.schedule import Schedule

T0 = 1_800_000_000.0  # a multiple of every interval below
TICK_S = 0.5
SCHEDULE = {"cpu": 60, "processes": 300, "ping": 60}
TYPES = ("cpu", "processes", "ping")
DB = GroupConfig(match={"role": "db"}, schedule={"processes": 60})


def birth(agent_id: str, labels: Mapping[str, str] | None = None, types: Iterable[str] = TYPES) -> Status:
    return Status(agent_id=agent_id, online=True, types=list(types), labels=dict(labels) if labels else None)


def run(schedule: Schedule, start_s: float, end_s: float) -> list[list[tuple[str, str]]]:
    return [schedule.due(start_s + k * TICK_S) for k in range(1, round((end_s - start_s) / TICK_S) + 1)]


def flat(ticks: Iterable[list[tuple[str, str]]]) -> Counter[tuple[str, str]]:
    return Counter(pair for tick in ticks for pair in tick)


def when(ticks: list[list[tuple[str, str]]], start_s: float) -> dict[tuple[str, str], list[float]]:
    """Each pair -> the times of the ticks it was due in."""
    out: dict[tuple[str, str], list[float]] = {}
    for k, tick in enumerate(ticks, 1):
        for pair in tick:
            out.setdefault(pair, []).append(start_s + k * TICK_S)
    return out


def mixed_fleet(groups: Iterable[GroupConfig] = (DB,), start_s: float = T0, n: int = 300) -> Schedule:
    """n agents from retained statuses: a third web, a third db, a third unlabelled."""
    schedule = Schedule(SCHEDULE, start_s=start_s, groups=list(groups))
    for i in range(n):
        labels = [{"role": "web"}, {"role": "db", "dc": "ams"}, None][i % 3]
        schedule.observe(birth(f"host-{i}", labels), start_s, live=False)
    return schedule


def test_a_group_changes_the_interval_of_the_agents_it_matches() -> None:
    """Over 300 s, db agents get five processes requests, the others one; cpu is untouched."""
    schedule = mixed_fleet()
    sent = flat(run(schedule, T0, T0 + 300))
    for i in range(300):
        assert sent[(f"host-{i}", "processes")] == (5 if i % 3 == 1 else 1)
        assert sent[(f"host-{i}", "cpu")] == 5


def test_later_groups_win_per_type_and_zero_turns_a_type_off() -> None:
    """Groups apply in order: the last matching one sets a type; 0 means not asked at all."""
    groups = [GroupConfig(match={"role": "db"}, schedule={"processes": 60, "cpu": 30}),
              GroupConfig(match={"dc": "ams"}, schedule={"cpu": 0, "ping": 120})]
    rules = Rules(SCHEDULE, groups)
    assert rules.intervals_for({"role": "db"}) == {"cpu": 30, "processes": 60, "ping": 60}
    assert rules.intervals_for({"role": "db", "dc": "ams"}) == {"processes": 60, "ping": 120}
    assert rules.intervals_for({"role": "web"}) == SCHEDULE
    schedule = mixed_fleet(groups)
    sent = flat(run(schedule, T0, T0 + 240))
    assert sent[("host-1", "cpu")] == 0 and sent[("host-1", "ping")] == 2 and sent[("host-1", "processes")] == 4
    assert sent[("host-0", "cpu")] == 4 and sent[("host-0", "ping")] == 4


def test_a_group_asks_only_types_the_agent_advertises() -> None:
    """A group naming a type the agent lacks, or a type not in controller.schedule, asks it only
    of agents that advertise it."""
    group = GroupConfig(match={"role": "db"}, schedule={"disk": 60})
    schedule = Schedule(SCHEDULE, start_s=T0, groups=[group])
    schedule.observe(birth("with-disk", {"role": "db"}, ["cpu", "disk"]), T0, live=False)
    schedule.observe(birth("without", {"role": "db"}, ["cpu"]), T0, live=False)
    assert flat(run(schedule, T0, T0 + 60)) == Counter({("with-disk", "cpu"): 1, ("with-disk", "disk"): 1,
                                                        ("without", "cpu"): 1})


def test_the_phase_depends_only_on_id_type_and_interval() -> None:
    """An agent whose interval a group leaves as it was is due at the same instants as without
    the group; agents of one interval are due where an unlabelled agent of that interval is."""
    plain = mixed_fleet(groups=())
    grouped = mixed_fleet([GroupConfig(match={"role": "web"}, schedule={"cpu": 60}), DB])
    a, b = when(run(plain, T0, T0 + 300), T0), when(run(grouped, T0, T0 + 300), T0)
    for i in range(300):
        assert a[(f"host-{i}", "cpu")] == b[(f"host-{i}", "cpu")]
        if i % 3 != 1:
            assert a[(f"host-{i}", "processes")] == b[(f"host-{i}", "processes")]
    alone = Schedule({"processes": 60}, start_s=T0)
    alone.observe(birth("host-1", types=["processes"]), T0, live=False)
    assert when(run(alone, T0, T0 + 300), T0)[("host-1", "processes")] == b[("host-1", "processes")]


def test_new_labels_in_a_birth_change_the_schedule_at_once() -> None:
    """A web agent that is born again as db is asked on db's intervals from then on, and not
    asked again for a type its new group turns off; no first round, it was online already."""
    off = GroupConfig(match={"role": "db"}, schedule={"ping": 0, "processes": 60})
    schedule = Schedule(SCHEDULE, start_s=T0, groups=[off])
    schedule.observe(birth("h", {"role": "web"}), T0, live=False)
    assert schedule.interval_of("h", "processes") == 300
    assert schedule.observe(birth("h", {"role": "db"}), T0 + 1, live=True) == []
    assert schedule.interval_of("h", "processes") == 60 and schedule.interval_of("h", "ping") is None
    sent = flat(run(schedule, T0 + 1, T0 + 301))
    assert sent[("h", "processes")] == 5 and sent[("h", "ping")] == 0 and sent[("h", "cpu")] == 5
    assert sum(len(w.buckets) for (t, _), w in schedule.wheels.items() if t == "ping") == 0


def test_a_reload_keeps_unchanged_phases_and_sends_nothing_extra() -> None:
    """Reloading mid-interval with cpu unchanged, processes sped up for db and ping off for web:
    cpu is due at exactly the instants it would have been, the moved pairs at their new phase
    (as a controller started with the new file asks them), and nothing at the reload itself."""
    new_groups = [DB, GroupConfig(match={"role": "web"}, schedule={"ping": 0, "processes": 120})]
    reloaded = mixed_fleet(groups=())
    first = run(reloaded, T0, T0 + 25)
    change = reloaded.replace_rules(SCHEDULE, new_groups)
    assert change.agents == 200 and change.stopped == 100 and change.moved == 200 and change.started == 0
    assert reloaded.due(T0 + 25) == []  # the reload itself asks nothing
    after = when(run(reloaded, T0 + 25, T0 + 625), T0 + 25)
    untouched = when(run(mixed_fleet(groups=()), T0, T0 + 625), T0)
    fresh = when(run(mixed_fleet(new_groups, start_s=T0 + 25), T0 + 25, T0 + 625), T0 + 25)
    assert after == fresh
    for i in range(300):
        cpu = (f"host-{i}", "cpu")
        assert sorted(when(first, T0).get(cpu, []) + after[cpu]) == untouched[cpu]
    assert not any(t == "ping" and int(a.split("-")[1]) % 3 == 0 for a, t in after)


def test_a_reload_to_the_same_rules_changes_nothing() -> None:
    """The same schedule and groups again: no agent moves, and the due times are the same."""
    a, b = mixed_fleet(), mixed_fleet()
    change = b.replace_rules(SCHEDULE, [DB])
    assert change.agents == 0
    assert run(a, T0, T0 + 300) == run(b, T0, T0 + 300)


def test_a_reload_that_drops_a_type_leaves_no_wheel_behind() -> None:
    """Types that no agent takes any more are forgotten by the tick."""
    schedule = mixed_fleet()
    schedule.replace_rules({"cpu": 60}, [])
    assert set(schedule.wheels) == {("cpu", 60)}
    assert flat(run(schedule, T0, T0 + 300)) == Counter({(f"host-{i}", "cpu"): 5 for i in range(300)})


def test_a_fleet_of_made_up_label_sets_does_not_grow_the_cache_without_bound() -> None:
    """Each agent with labels of its own still gets the right intervals, and the shared plans
    stay bounded however many label sets are seen."""
    schedule = Schedule(SCHEDULE, start_s=T0, groups=[DB])
    for i in range(CACHE_MAX + 500):
        schedule.observe(birth(f"h{i}", {"role": "db" if i % 2 else "web", "n": str(i)}), T0, live=False)
    assert len(schedule.planner._plans) <= CACHE_MAX
    assert schedule.interval_of("h1", "processes") == 60 and schedule.interval_of("h2", "processes") == 300
    assert schedule.interval_of(f"h{CACHE_MAX + 499}", "processes") == 60


@pytest.mark.parametrize(("group", "key"), [
    ({"match": {}, "schedule": {"cpu": 5}}, "controller.groups[0].match"),
    ({"schedule": {"cpu": 5}}, "controller.groups[0].match"),
    ({"match": {"Role": "db"}, "schedule": {"cpu": 5}}, "controller.groups[0].match"),
    ({"match": {"role": "d b"}, "schedule": {"cpu": 5}}, "controller.groups[0].match"),
    ({"match": {"role": "db"}}, "controller.groups[0].schedule"),
    ({"match": {"role": "db"}, "schedule": {"cpu": -1}}, "controller.groups[0].schedule.cpu"),
    ({"match": {"role": "db"}, "schedule": {"cpu": 0.5}}, "controller.groups[0].schedule.cpu"),
    ({"match": {"role": "db"}, "schedule": {"Cpu": 5}}, "controller.groups[0].schedule.Cpu"),
    ({"match": {"role": "db"}, "schedule": {"cpu": 10**9}}, "controller.groups[0].schedule.cpu"),
    ({"match": {"role": "db"}, "schedule": {"cpu": 5}, "when": "now"}, "controller.groups[0].when"),
])
def test_a_bad_group_is_a_config_error_naming_the_key(tmp_path: Path, group: dict[str, object], key: str) -> None:
    """Each wrong group is refused at load with the key that is wrong."""
    with pytest.raises(ConfigError) as caught:
        load_config_from({"controller": {"groups": [group]}}, tmp_path)
    assert caught.value.key == key


def test_schedule_zero_stays_refused_outside_groups(tmp_path: Path) -> None:
    """0 turns a type off in a group only; controller.schedule still needs a real interval."""
    with pytest.raises(ConfigError) as caught:
        load_config_from({"controller": {"schedule": {"cpu": 0}}}, tmp_path)
    assert caught.value.key == "controller.schedule.cpu"


def test_changed_keys_name_keys_as_written(tmp_path: Path) -> None:
    """What a reload says needs a restart is named the way the config file spells it."""
    old = Config()
    new = load_config_from({"controller": {"tick_s": 1.0, "metrics_port": 1234, "shard": "1/2",
                                           "groups": [{"match": {"role": "db"}, "schedule": {"cpu": 5}}]},
                            "mqtt": {"port": 1884, "tls": {"enabled": True}}}, tmp_path)
    assert sorted(changed_keys(old, new)) == ["controller.groups", "controller.metrics_port", "controller.shard",
                                              "controller.tick_s", "mqtt.port", "mqtt.tls.enabled"]
    assert changed_keys(old, Config()) == []


def load_config_from(raw: dict[str, object], tmp_path: Path) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), env={})
