"""Agent labels (design.md, "Labels"): checked in the config and in the birth, stored in agents.labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_for
from helpers import loads, rows

from fleet_common import ConfigError, ContractError, Status
from fleet_common.config import load_config
from fleet_common.labels import MAX_LABELS, check_labels, format_labels, matches, parse_pairs, select
from fleet_common.messages import parse_status
from fleet_common.topics import ParsedTopic

TOPIC = ParsedTopic("status", "web-01", None)


def birth(**extra: object) -> bytes:
    return Status(agent_id="web-01", online=True, hostname="web-01", types=["cpu"], extra=dict(extra)).payload()


def test_a_birth_carries_its_labels_and_a_will_none() -> None:
    status = Status(agent_id="web-01", online=True, hostname="web-01", types=["cpu"], labels={"role": "web"})
    assert parse_status(status.payload(), TOPIC).labels == {"role": "web"}
    assert "labels" not in Status(agent_id="web-01", online=True, types=["cpu"]).to_dict()
    assert parse_status(Status(agent_id="web-01", online=False).payload(), TOPIC).labels is None


@pytest.mark.parametrize("labels", [
    ["role", "web"], "role=web", {"Role": "web"}, {"role": ""}, {"role": "a b"}, {"role": 5},
    {"r" * 33: "x"}, {"role": "x" * 65}, {f"k{i}": "v" for i in range(MAX_LABELS + 1)}, {"1role": "x"},
])
def test_a_birth_with_bad_labels_is_refused(labels: object) -> None:
    with pytest.raises(ContractError) as err:
        parse_status(birth(labels=labels), TOPIC)
    assert err.value.reason == "bad_labels"


def test_labels_at_the_limits_pass() -> None:
    labels = {f"k{i}": "v" * 64 for i in range(MAX_LABELS - 1)} | {"k" + "x" * 31: "A.b-c_9"}
    assert check_labels(labels) == labels


def test_labels_load_from_the_file_and_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent:\n  labels: {role: web, dc: ams}\n")
    assert load_config(str(cfg), env={}).agent.labels == {"role": "web", "dc": "ams"}
    assert load_config(str(cfg), env={"FLEET_AGENT_LABELS": "role=db"}).agent.labels == {"role": "db"}
    env = {"FLEET_AGENT_LABELS": "role=db, dc=fra"}
    assert load_config(str(cfg), env=env).agent.labels == {"role": "db", "dc": "fra"}
    assert load_config(str(cfg), env={"FLEET_AGENT_LABELS": ""}).agent.labels == {}
    assert load_config(str(cfg), env={"FLEET_AGENT_LABELS": "{role: x}"}).agent.labels == {"role": "x"}


@pytest.mark.parametrize(("yaml_text", "env", "needle"), [
    ("agent:\n  labels: {Role: web}\n", {}, "'Role'"),
    ("agent:\n  labels: {role: 'a b'}\n", {}, "'a b'"),
    ("agent:\n  labels: [role]\n", {}, "mapping"),
    ("", {"FLEET_AGENT_LABELS": "role"}, "FLEET_AGENT_LABELS"),
    ("", {"FLEET_AGENT_LABELS": "role=a/b"}, "'a/b'"),
    ("", {"FLEET_AGENT_LABELS": ",".join(f"k{i}=v" for i in range(17))}, "at most 16"),
])
def test_bad_labels_stop_start_up_naming_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str],
                                                 needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), env=env)
    assert err.value.key == "agent.labels" and needle in str(err.value)


def test_selectors() -> None:
    assert parse_pairs("role=web,dc=ams") == {"role": "web", "dc": "ams"}
    assert select(["role=web", "dc=ams"]) == {"role": "web", "dc": "ams"}
    for bad in (["role"], ["role=web,dc=ams"], ["Role=web"]):
        with pytest.raises(ValueError):
            select(bad)
    assert matches({"role": "web", "dc": "ams"}, {"role": "web"})
    assert not matches({"role": "web"}, {"role": "web", "dc": "ams"})
    assert not matches(None, {"role": "web"}) and matches(None, {})
    assert format_labels({"role": "web", "dc": "ams"}) == "dc=ams,role=web"


def test_an_agents_labels_from_config_and_environment_reach_the_store(tmp_path, write_config, procs) -> None:
    """Two real agents, one labelled in its config file and one by FLEET_AGENT_LABELS, against a real
    broker and persister: agents.labels holds each one's labels; a restart without labels clears them,
    and its goodbye does not."""
    db = tmp_path / "fleet.db"
    procs.start_persister(write_config())
    procs.start("a", "fleet-agent", "--config",
                str(write_config("a", agent={"id": "host-a", "labels": {"role": "web", "dc": "ams"}})))
    procs.start("b", "fleet-agent", "--config", str(write_config("b", agent={"id": "host-b"})),
                env={"FLEET_AGENT_LABELS": "role=db,dc=fra"})

    def labels() -> dict[str, object]:
        return {r["agent_id"]: loads(r["labels"]) for r in rows(db, "select agent_id, labels from agents")}

    wait_for(lambda: labels() == {"host-a": {"role": "web", "dc": "ams"}, "host-b": {"role": "db", "dc": "fra"}},
             20, what="both agents' labels stored")
    procs.stop("b")
    wait_for(lambda: rows(db, "select online from agents where agent_id='host-b'")[0]["online"] == 0, 15,
             what="host-b recorded offline")
    assert labels()["host-b"] == {"role": "db", "dc": "fra"}
    procs.start("b2", "fleet-agent", "--config", str(write_config("b", agent={"id": "host-b"})))
    wait_for(lambda: labels()["host-b"] == {}, 20, what="host-b's labels cleared by a birth without them")
