"""The config loader reads field types with typing, so every annotation spelling loads the same
from YAML and from FLEET_* variables; sections check themselves; errors name the key the user wrote."""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import pytest
import yaml

from fleet_common.config import (
    SECTIONS,
    Config,
    ConfigError,
    ControllerConfig,
    MetricsConfig,
    PersisterConfig,
    Shard,
    build_sections,
    eval_annotation,
    load_config,
    postponed_hints,
)


@dataclass(frozen=True)
class Inner:
    enabled: bool = False
    name: Optional[str] = None


@dataclass(frozen=True)
class OldSpelling:
    port: Optional[int] = None
    ratio: float = 1.0
    names: List[str] = field(default_factory=list)
    limits: Dict[str, int] = field(default_factory=dict)
    mode: Literal["fast", "safe"] = "safe"
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class NewSpelling:
    port: int | None = None
    ratio: float = 1.0
    names: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)
    mode: Literal["fast", "safe"] = "safe"
    inner: Inner = field(default_factory=Inner)


SPELLINGS = [OldSpelling, NewSpelling]


@pytest.fixture(autouse=True)
def no_config_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # load_config(None) reads ./config.yaml
YAML = """
spelt:
  port: 1884
  ratio: 2
  names: [a, b]
  limits: {cpu: 60}
  mode: fast
  inner: {enabled: true, name: x}
"""


def load(cls: Any, text: str = "", env: Optional[Mapping[str, str]] = None) -> Any:
    return build_sections(yaml.safe_load(text) or {}, env or {}, {"spelt": cls})["spelt"]


def key_of_error(cls: Any, text: str = "", env: Optional[Mapping[str, str]] = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(cls, text, env)
    assert "\n" not in str(info.value)
    return info.value.key


@pytest.mark.parametrize("cls", SPELLINGS)
def test_every_spelling_loads_from_yaml(cls: Any) -> None:
    """Optional[int] and int | None, List and list, Dict and dict, Literal and a nested dataclass all load."""
    got = load(cls, YAML)
    assert (got.port, got.ratio, got.names, got.limits, got.mode) == (1884, 2.0, ["a", "b"], {"cpu": 60}, "fast")
    assert got.inner == Inner(enabled=True, name="x") and isinstance(got.ratio, float)
    assert load(cls, "spelt: {port: null}").port is None
    assert load(cls) == cls()


@pytest.mark.parametrize("cls", SPELLINGS)
def test_every_spelling_loads_from_the_environment(cls: Any) -> None:
    """FLEET_<SECTION>_<KEY> gives each spelling a value of its type, nested keys included."""
    env = {"FLEET_SPELT_PORT": "1884", "FLEET_SPELT_NAMES": "[a]", "FLEET_SPELT_LIMITS": "{cpu: 5}",
           "FLEET_SPELT_MODE": "fast", "FLEET_SPELT_INNER_ENABLED": "true", "FLEET_SPELT_INNER_NAME": "007"}
    got = load(cls, YAML, env)
    assert (got.port, got.names, got.limits, got.mode, got.inner) == (1884, ["a"], {"cpu": 5}, "fast",
                                                                       Inner(True, "007"))
    assert load(cls, env={"FLEET_SPELT_PORT": ""}).port is None


@pytest.mark.parametrize("cls", SPELLINGS)
@pytest.mark.parametrize(("text", "env", "key"), [
    ("spelt: {port: many}", {}, "spelt.port"),
    ("spelt: {port: 1.5}", {}, "spelt.port"),
    ("spelt: {names: [a, {b: c}]}", {}, "spelt.names[1]"),
    ("spelt: {names: a}", {}, "spelt.names"),
    ("spelt: {limits: {cpu: x}}", {}, "spelt.limits.cpu"),
    ("spelt: {mode: quick}", {}, "spelt.mode"),
    ("spelt: {inner: {enabled: 1}}", {}, "spelt.inner.enabled"),
    ("spelt: {inner: {nmae: x}}", {}, "spelt.inner.nmae"),
    ("spelt: {ratio: null}", {}, "spelt.ratio"),
    ("", {"FLEET_SPELT_INNER_NAMES": "x"}, "spelt.names"),
    ("", {"FLEET_SPELT_PROT": "1"}, "spelt.prot"),
])
def test_every_spelling_names_the_bad_key(cls: Any, text: str, env: Dict[str, str], key: str) -> None:
    assert key_of_error(cls, text, env) == key


def test_a_literal_says_what_it_may_be() -> None:
    with pytest.raises(ConfigError, match="'quick' must be 'fast' or 'safe'"):
        load(NewSpelling, "spelt: {mode: quick}")
    with pytest.raises(ConfigError, match="'postgres' must be 'sqlite' or 'mongodb'"):
        load_config(None, env={"FLEET_PERSISTER_STORE": "postgres"})
    assert load_config(None, env={"FLEET_PERSISTER_STORE": "mongodb"}).persister.store == "mongodb"


@pytest.mark.parametrize(("text", "expected"), [
    ("int | None", Optional[int]),
    ("Dict[str, int | None]", Dict[str, Optional[int]]),
    ("list[str] | None", Optional[list[str]]),
    ("Literal['a', 'b'] | int | None", typing.Union[Literal["a", "b"], int, None]),
])
def test_python_3_9_reads_pep_604_annotations(text: str, expected: Any) -> None:
    """Python 3.9 cannot evaluate `int | None`; the loader's fallback reads it as Optional[int]."""
    assert eval_annotation(text, vars(typing)) == expected


def test_the_python_3_9_fallback_gives_what_get_type_hints_gives() -> None:
    for cls in (OldSpelling, *SECTIONS.values()):
        assert postponed_hints(cls) == typing.get_type_hints(cls), cls
    assert postponed_hints(NewSpelling)["port"] == Optional[int]


def test_the_shipped_defaults_load_back_from_the_keys_users_write() -> None:
    """Every section's defaults, written out under the YAML keys config.yaml documents, load back the same."""
    defaults = Config()
    raw: Dict[str, Dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            if f.metadata.get("flat"):
                raw.setdefault(section, {}).update({f"{f.name}_{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                raw.setdefault(section, {})[f.name] = str(value) if isinstance(value, Shard) else (
                    dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    assert Config(**build_sections(yaml.safe_load(yaml.safe_dump(raw)), {})) == defaults


def test_metrics_and_heartbeat_keys_stay_flat() -> None:
    """metrics_* and heartbeat_* are written flat in each section, as before; a key left out keeps
    that section's default."""
    cfg = load_config(None, env={"FLEET_PERSISTER_METRICS_PORT": "9999", "FLEET_CONTROLLER_METRICS_ENABLED": "true",
                                 "FLEET_AGENT_HEARTBEAT_INTERVAL_S": "1"})
    assert cfg.persister.metrics == MetricsConfig(enabled=False, host="127.0.0.1", port=9999)
    assert cfg.controller.metrics == MetricsConfig(enabled=True, port=9811)
    assert (cfg.agent.heartbeat.path, cfg.agent.heartbeat.interval_s) == ("~/.local/state/fleet-agent/heartbeat.json",
                                                                           1.0)
    assert cfg.persister.heartbeat.path == "data/fleet-persister.heartbeat.json"
    assert cfg.get("persister.metrics_port") == 9999 and cfg.get("mqtt.tls.enabled") is False


@pytest.mark.parametrize(("text", "key"), [
    ("controller: {metrics_port: 0}", "controller.metrics_port"),
    ("persister: {metrics_port: 70000}", "persister.metrics_port"),
    ("persister: {metrics_prot: 1}", "persister.metrics_prot"),
    ("agent: {heartbeat_interval_s: x}", "agent.heartbeat_interval_s"),
    ("agent: {metrics_port: 1}", "agent.metrics_port"),
    ("mqtt: {topic_prefix: 'a/#'}", "mqtt.topic_prefix"),
    ("dashboard: {port: 0}", "dashboard.port"),
    ("log: {level: loud}", "log.level"),
    ("log: {format: xml}", "log.format"),
    ("controller: {max_dispatch_per_s: 0}", "controller.max_dispatch_per_s"),
    ("persister: {retention_s: {processes: 5}}", "persister.retention_s.default"),
    ("persister: {trend_retention_s: 60}", "persister.trend_retention_s"),
    ("persister: {trend_retention_s: a year}", "persister.trend_retention_s"),
    ("controller: {shard: 1}", "controller.shard"),
    ("controller: {shard: a/b}", "controller.shard"),
    ("controller: {shard: 0/0}", "controller.shard"),
])
def test_each_section_checks_itself_and_names_the_key(tmp_path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.key == key and str(info.value).startswith(f"config key '{key}': ")


def test_shard_is_parsed_once_at_load() -> None:
    """controller.shard stays the string "i/n" in YAML and the environment, and loads as a Shard."""
    cfg = load_config(None, env={"FLEET_CONTROLLER_SHARD": "1/2"})
    assert cfg.controller.shard == Shard(1, 2) and str(cfg.controller.shard) == "1/2"
    assert ControllerConfig().shard == Shard(0, 1)
    with pytest.raises(ConfigError, match="'3/2' must be 'i/n' with 0 <= i < n"):
        load_config(None, env={"FLEET_CONTROLLER_SHARD": "3/2"})


def test_a_section_made_in_code_checks_itself_too() -> None:
    with pytest.raises(ConfigError, match="share_group"):
        PersisterConfig(shared_subscription=True)
    with pytest.raises(ValueError):
        Shard(2, 2)


@pytest.mark.skipif(sys.version_info >= (3, 10), reason="the 3.9 path: get_type_hints fails on int | None")
def test_on_python_3_9_get_type_hints_fails_and_the_loader_does_not() -> None:
    with pytest.raises(TypeError):
        typing.get_type_hints(NewSpelling)
    assert load(NewSpelling, "spelt: {port: 1}").port == 1
