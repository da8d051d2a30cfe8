"""Typed, frozen configuration: YAML file, then FLEET_<SECTION>_<KEY> environment overrides.

Loaded once at start. An unknown key or a value of the wrong type stops start-up
with a ConfigError that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from .errors import ConfigError
from .messages import EXPIRES_FUTURE_S
from .topics import TYPE_RE, Topics, check_agent_id

BUILTIN_TYPES = ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")
# A share group name is a secret: Mosquitto 2.0 lets any client join any group and drops the
# messages it hands a member that may not read them, so a guessable group lets one agent's
# credentials make a share of every answer go unstored.
SHARE_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{16,}$")
DEFAULT_SCHEDULE = {"os_info": 3600, "cpu": 60, "memory": 60, "disk": 300,
                    "network": 60, "processes": 300, "ping": 60}


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "fleet"
    username: Optional[str] = None
    password: Optional[str] = None
    client_id: Optional[str] = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TlsConfig = field(default_factory=TlsConfig)

    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass(frozen=True)
class AgentConfig:
    id: Optional[str] = None
    session_expiry_s: int = 604800
    outbox_path: str = "~/.local/state/fleet-agent/outbox.db"
    outbox_max_messages: int = 10000
    collector_timeout_s: float = 10.0
    workers: int = 2
    heartbeat_path: str = "~/.local/state/fleet-agent/heartbeat.json"
    heartbeat_interval_s: float = 5.0


@dataclass(frozen=True)
class ControllerConfig:
    schedule: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    offline_forget_s: int = 86400
    shard: str = "0/1"
    tick_s: float = 0.5
    max_unacked_requests: int = 50000
    max_dispatch_per_s: int = 2000
    client_id: Optional[str] = None
    heartbeat_path: str = "data/fleet-controller.heartbeat.json"
    heartbeat_interval_s: float = 5.0
    metrics_enabled: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9811

    def shard_index(self) -> Tuple[int, int]:
        index, count = (int(x) for x in self.shard.split("/"))
        return index, count


@dataclass(frozen=True)
class PersisterConfig:
    store: str = "sqlite"
    sqlite_path: str = "data/fleet.db"
    mongodb_uri: str = "mongodb://localhost:27017"
    mongodb_database: str = "fleet"
    retention_s: Dict[str, int] = field(default_factory=lambda: {"default": 2592000, "processes": 86400})
    batch_size: int = 500
    batch_wait_s: float = 0.2
    receive_maximum: int = 3000
    parse_workers: Optional[int] = None  # None: one per core beyond the first, up to 4
    shared_subscription: bool = False
    share_group: Optional[str] = None  # required when shared: a per-deployment secret (SHARE_GROUP_RE)
    session_expiry_s: int = 604800
    client_id: Optional[str] = None
    expire_grace_s: float = 5.0
    sweep_interval_s: float = 5.0
    heartbeat_path: str = "data/fleet-persister.heartbeat.json"
    heartbeat_interval_s: float = 5.0
    metrics_enabled: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9812


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    refresh_s: float = 5.0
    stats_window_s: int = 900
    silent_after_s: int = 300
    ask_enabled: bool = False
    ask_timeout_s: float = 10.0
    operator_token: Optional[str] = None
    mqtt_username: Optional[str] = None
    mqtt_password: Optional[str] = None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    persister: PersisterConfig = field(default_factory=PersisterConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Optional[str] = field(default=None, compare=False)

    def replace(self, section: str, **changes: Any) -> Config:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


SECTIONS = {"mqtt": MqttConfig, "agent": AgentConfig, "controller": ControllerConfig,
            "persister": PersisterConfig, "dashboard": DashboardConfig, "log": LogConfig}
_NESTED = {"tls": TlsConfig}


def _coerce(key: str, type_str: str, value: Any) -> Any:
    optional = type_str.startswith("Optional[")
    base = type_str[len("Optional["):-1] if optional else type_str
    if value is None:
        if optional:
            return None
        raise ConfigError(key, "must not be empty")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, not {value!r}")
    if base in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, not {value!r}")
        if base == "int" and value != int(value):
            raise ConfigError(key, f"must be a whole number, not {value!r}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, not {value!r}")
        return int(value) if base == "int" else float(value)
    if base == "str":
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"must be a single value, not {type(value).__name__}")
        return str(value)
    if base == "Dict[str, int]":
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a mapping of name: seconds")
        return {str(k): _coerce(f"{key}.{k}", "int", v) for k, v in value.items()}
    raise AssertionError(f"unhandled config type {type_str}")


def _build(cls: Any, prefix: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, "must be a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        if name not in fields:
            raise ConfigError(key, f"unknown key; known keys in '{prefix}': {', '.join(sorted(fields))}")
        if name in _NESTED:
            values[name] = _build(_NESTED[name], key, value)
        else:
            values[name] = _coerce(key, str(fields[name].type), value)
    return cls(**values)


def _env_overrides(env: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    """FLEET_MQTT_PORT=1884 -> {"mqtt": {"port": 1884}}; FLEET_MQTT_TLS_ENABLED -> mqtt.tls.enabled."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, text in env.items():
        if not name.startswith("FLEET_"):
            continue
        rest = name[len("FLEET_"):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # FLEET_TEST_* and the like belong to other tools
        key = rest[len(section) + 1:]
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        nested = next((n for n in _NESTED if key.startswith(n + "_") and n in known), None)
        if nested:
            inner = key[len(nested) + 1:]
            out.setdefault(section, {}).setdefault(nested, {})[inner] = _env_value(_NESTED[nested], inner, text)
        elif key in known:
            out.setdefault(section, {})[key] = _env_value(SECTIONS[section], key, text)
        else:
            raise ConfigError(f"{section}.{key}", f"unknown key (from environment variable {name})")
    return out


def _env_value(cls: Any, key: str, text: str) -> Any:
    """Text for string keys (a password of digits stays a string), else YAML: 1884, true, null."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    if types.get(key) in ("str", "Optional[str]"):
        return text
    return yaml.safe_load(text) if text != "" else None


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validate(cfg: Config) -> None:
    Topics(cfg.mqtt.topic_prefix)  # raises on a bad prefix
    if not 0 < cfg.mqtt.port < 65536:
        raise ConfigError("mqtt.port", f"{cfg.mqtt.port} is not a TCP port")
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(cfg.mqtt.tls, name)
        if cfg.mqtt.tls.enabled and value is not None and not Path(value).expanduser().is_file():
            raise ConfigError(f"mqtt.tls.{name}", f"file {value!r} does not exist or is not readable")
    if cfg.mqtt.tls.enabled and (cfg.mqtt.tls.cert_file is None) != (cfg.mqtt.tls.key_file is None):
        raise ConfigError("mqtt.tls.key_file", "a client certificate needs both cert_file and key_file")
    if cfg.agent.id is not None:
        try:
            check_agent_id(cfg.agent.id)
        except Exception:
            raise ConfigError("agent.id", f"{cfg.agent.id!r} must be 1-64 characters of [A-Za-z0-9_.-]") from None
    for name, seconds in cfg.controller.schedule.items():
        if not TYPE_RE.match(name):
            raise ConfigError(f"controller.schedule.{name}", "is not a valid request type name")
        if seconds < 1:
            raise ConfigError(f"controller.schedule.{name}", "interval must be at least 1 second")
        if seconds > EXPIRES_FUTURE_S:
            # a request expires one interval after it is sent, and receivers refuse an expiry further ahead
            raise ConfigError(f"controller.schedule.{name}", f"interval must be at most {EXPIRES_FUTURE_S:.0f} "
                                                             "seconds (366 days)")
    if not re.match(r"^\d+/[1-9]\d*$", cfg.controller.shard) or \
            cfg.controller.shard_index()[0] >= cfg.controller.shard_index()[1]:
        raise ConfigError("controller.shard", f"{cfg.controller.shard!r} must be 'i/n' with 0 <= i < n")
    if cfg.controller.max_unacked_requests < 1:
        raise ConfigError("controller.max_unacked_requests", "must be at least 1")
    if cfg.controller.max_dispatch_per_s < 1:
        raise ConfigError("controller.max_dispatch_per_s", "must be at least 1 request a second")
    if cfg.persister.store not in ("sqlite", "mongodb"):
        raise ConfigError("persister.store", f"{cfg.persister.store!r} must be 'sqlite' or 'mongodb'")
    if "default" not in cfg.persister.retention_s:
        raise ConfigError("persister.retention_s.default", "is required")
    _validate_share_group(cfg.persister)
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"{cfg.log.level!r} must be debug, info, warning or error")
    for section in ("controller", "persister"):
        if not 0 < getattr(cfg, section).metrics_port < 65536:
            raise ConfigError(f"{section}.metrics_port", f"{getattr(cfg, section).metrics_port} is not a TCP port")
    if not 0 < cfg.dashboard.port < 65536:
        raise ConfigError("dashboard.port", f"{cfg.dashboard.port} is not a TCP port")
    if cfg.dashboard.ask_enabled and not cfg.dashboard.operator_token:
        raise ConfigError("dashboard.operator_token", "is required when dashboard.ask_enabled is true "
                          "(set FLEET_DASHBOARD_OPERATOR_TOKEN to a long random string)")
    if cfg.log.format not in ("text", "json"):
        raise ConfigError("log.format", f"{cfg.log.format!r} must be 'text' or 'json'")


def _validate_share_group(pcfg: PersisterConfig) -> None:
    make_one = ("`fleetctl add-user NAME --role persister` writes the deployment's group into the config it makes, "
                "or make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(18))'")
    if pcfg.share_group is None:
        if pcfg.shared_subscription:
            raise ConfigError("persister.share_group", "is required when persister.shared_subscription is true: "
                              "a secret group name shared by this deployment's persisters; " + make_one)
    elif not SHARE_GROUP_RE.match(pcfg.share_group):
        raise ConfigError("persister.share_group", "must be at least 16 characters of [A-Za-z0-9_-] "
                          "(a secret: any client that knows it can make messages go unstored); " + make_one)


def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                required: bool = False) -> Config:
    """Read `path` (default ./config.yaml; a missing default file means built-in defaults),
    apply environment overrides, check every key, and return a frozen Config."""
    env = os.environ if env is None else env
    file = Path(path or "config.yaml")
    raw: Dict[str, Any] = {}
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(str(file), f"is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(file), "must hold a mapping of sections")
        raw = loaded or {}
    elif path is not None or required:
        raise ConfigError("--config", f"file {str(file)!r} does not exist")
    raw = _merge(raw, _env_overrides(env))
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section; known sections: {', '.join(SECTIONS)}")
    cfg = Config(**{name: _build(cls, name, raw.get(name)) for name, cls in SECTIONS.items()},
                 source=str(file) if file.exists() else None)
    _validate(cfg)
    return cfg
