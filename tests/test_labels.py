"""Agent labels (design.md, "Labels"): checked in the config and in the birth, stored in agents.labels."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, wait_for
from helpers import loads, rows

from fleet_common import ConfigError, ContractError, Status, iso
from fleet_common.cli import run_main
from fleet_common.config import load_config
from fleet_common.labels import MAX_LABELS, check_labels, format_labels, matches, parse_pairs, select
from fleet_common.messages import parse_status
from fleet_common.topics import ParsedTopic
from fleet_store import Batch, Incoming
from fleet_store.sqlite import SqliteStore
from fleetctl import cli

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


def labelled_store(tmp_path: Path) -> Path:
    """A config whose SQLite store knows web-01 (role=web, dc=ams), web-02 (role=web, dc=fra) and
    db-01 (role=db, dc=ams), and bare-01 without labels."""
    db = tmp_path / "fleet.db"
    store = SqliteStore(str(db))
    now = iso(time.time())
    for agent, labels in (("web-01", {"role": "web", "dc": "ams"}), ("web-02", {"role": "web", "dc": "fra"}),
                          ("db-01", {"role": "db", "dc": "ams"}), ("bare-01", {})):
        status = Status(agent_id=agent, online=True, ts=now, platform="Linux", labels=labels)
        store.write(Batch(statuses=[Incoming(status, agent, now)]))
    store.close()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"persister": {"sqlite_path": str(db)}}))
    return cfg


def fleetctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetctl"), "--config", str(cfg), *args], capture_output=True, text=True,
                          timeout=30)


def test_fleetctl_status_shows_labels_and_filters_by_them(tmp_path: Path) -> None:
    """`fleetctl status` shows each agent's labels (k=v,k=v in the table, an object in --json) and
    `--label` keeps the agents whose labels include every pair given."""
    cfg = labelled_store(tmp_path)
    done = fleetctl(cfg, "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[-1] == "LABELS"
    assert next(x for x in lines if x.startswith("web-01 ")).endswith(" dc=ams,role=web")
    assert next(x for x in lines if x.startswith("bare-01 ")).endswith(" -")

    done = fleetctl(cfg, "status", "--json", "--label", "role=web", "--label", "dc=ams")
    assert done.returncode == 0, done.stderr
    assert [(a["agent_id"], a["labels"]) for a in json.loads(done.stdout)] == [("web-01", {"role": "web", "dc": "ams"})]


def test_status_label_selections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every pair must match; no pair is everyone; the table says which labels it kept."""
    cfg = str(labelled_store(tmp_path))

    def selected(*labels: str) -> dict[str, object]:
        assert cli.main(["--config", cfg, "status", "--json", *[a for x in labels for a in ("--label", x)]]) == 0
        return {a["agent_id"]: a["labels"] for a in json.loads(capsys.readouterr().out)}

    assert selected() == {"web-01": {"role": "web", "dc": "ams"}, "web-02": {"role": "web", "dc": "fra"},
                          "db-01": {"role": "db", "dc": "ams"}, "bare-01": {}}
    assert sorted(selected("role=web")) == ["web-01", "web-02"]
    assert sorted(selected("dc=ams")) == ["db-01", "web-01"]
    assert selected("role=build") == {}
    assert cli.main(["--config", cfg, "status", "--label", "role=web", "--label", "dc=ams"]) == 0
    assert "1 of 1 agents with labels dc=ams,role=web online" in capsys.readouterr().out
    assert cli.main(["--config", cfg, "status", "--label", "role=build"]) == 0
    assert "no agent has labels role=build" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["role", "Role=web", "role=", "role=web,dc=ams"])
def test_fleetctl_status_refuses_a_bad_label_in_one_line(tmp_path: Path, bad: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A --label that is not one valid key=value pair stops `fleetctl status` with one line and exit 2."""
    assert run_main("fleetctl", cli.main, ["--config", str(labelled_store(tmp_path)), "status", "--label", bad]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fleetctl: --label: ") and err.count("\n") == 1, err
