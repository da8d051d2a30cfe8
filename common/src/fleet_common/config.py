"""Typed, frozen configuration: YAML file, then FLEET_<SECTION>_<KEY> environment overrides.

Loaded once at start. An unknown key or a value of the wrong type stops start-up
with a ConfigError that names the key.

The loader reads each field's type with typing.get_type_hints, so any spelling of an
annotation loads (`Optional[int]` or `int | None`, `Dict[str, int]` or `dict[str, int]`,
`Literal[...]`, a nested dataclass). Each section checks its own values in `__post_init__`
and names the key relative to itself ('port'); the loader adds where it sits ('mqtt.port').
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, ConfigFileError, ContractError
from .labels import check_labels, parse_pairs
from .messages import EXPIRES_FUTURE_S
from .topics import TYPE_RE, Topics, check_agent_id

BUILTIN_TYPES = ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")
# A share group name is a secret: Mosquitto 2.0 lets any client join any group and drops the
# messages it hands a member that may not read them, so a guessable group lets one agent's
# credentials make a share of every answer go unstored.
SHARE_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{16,}$")
DEFAULT_SCHEDULE = {"os_info": 3600, "cpu": 60, "memory": 60, "disk": 300,
                    "network": 60, "processes": 300, "ping": 60}
# A nested dataclass whose fields are written flat in its section: `metrics: MetricsConfig`
# is read from the keys metrics_enabled, metrics_host and metrics_port. Its default is a value
# (field(default=...)): keys not written keep the section's own default.
FLAT = {"flat": True}


def _check_port(key: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(key, f"{port} is not a TCP port")


@dataclass(frozen=True)
class Shard:
    """`controller.shard: "i/n"`: this controller schedules the agents whose id hashes to shard i of n."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"'{self}' must be 'i/n' with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"(\d+)/(\d+)", text)
        if match is None:
            raise ValueError(f"{text!r} must be 'i/n' with 0 <= i < n")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class HeartbeatConfig:
    """A section's heartbeat_path and heartbeat_interval_s: the health file it rewrites, and how often."""

    path: str
    interval_s: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    """A section's metrics_enabled, metrics_host and metrics_port: its Prometheus endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9811

    def __post_init__(self) -> None:
        _check_port("port", self.port)


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(name, f"file {value!r} does not exist or is not readable")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("key_file", "a client certificate needs both cert_file and key_file")


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "fleet"
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        try:
            self.topics()
        except ContractError as exc:
            raise ConfigError("topic_prefix", exc.detail) from None

    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass(frozen=True)
class AgentConfig:
    id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    session_expiry_s: int = 604800
    outbox_path: str = "~/.local/state/fleet-agent/outbox.db"
    outbox_max_messages: int = 10000
    collector_timeout_s: float = 10.0
    workers: int = 2
    heartbeat: HeartbeatConfig = field(default=HeartbeatConfig("~/.local/state/fleet-agent/heartbeat.json"),
                                       metadata=FLAT)

    def __post_init__(self) -> None:
        if self.id is not None:
            try:
                check_agent_id(self.id)
            except Exception:
                raise ConfigError("id", f"{self.id!r} must be 1-64 characters of [A-Za-z0-9_.-]") from None
        try:
            check_labels(self.labels)
        except ContractError as exc:
            raise ConfigError("labels", exc.detail) from None


def _check_intervals(key: str, schedule: Mapping[str, int], off_allowed: bool) -> None:
    """Each `type: seconds` of a schedule: a valid type name, and an interval a request can expire in."""
    for name, seconds in schedule.items():
        if not TYPE_RE.match(name):
            raise ConfigError(f"{key}.{name}", "is not a valid request type name")
        if seconds == 0 and off_allowed:
            continue
        if seconds < 1:
            raise ConfigError(f"{key}.{name}", "interval must be at least 1 second" + (" (0 turns the type off)"
                                                                                    if off_allowed else ""))
        if seconds > EXPIRES_FUTURE_S:
            # a request expires one interval after it is sent, and receivers refuse an expiry further ahead
            raise ConfigError(f"{key}.{name}", f"interval must be at most {EXPIRES_FUTURE_S:.0f} seconds (366 days)")


@dataclass(frozen=True)
class GroupConfig:
    """One of `controller.groups`: the agents whose labels include every pair of `match` take
    `schedule`'s intervals over controller.schedule's (0 turns a type off for them)."""

    match: dict[str, str] = field(default_factory=dict)
    schedule: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.match:
            raise ConfigError("match", "must name at least one label, e.g. {role: db} (to change every "
                                       "agent's intervals, change controller.schedule)")
        try:
            check_labels(self.match)
        except ContractError as exc:
            raise ConfigError("match", exc.detail) from None
        if not self.schedule:
            raise ConfigError("schedule", "must give at least one type: seconds, e.g. {processes: 60}")
        _check_intervals("schedule", self.schedule, off_allowed=True)


@dataclass(frozen=True)
class ControllerConfig:
    schedule: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    groups: list[GroupConfig] = field(default_factory=list)
    offline_forget_s: int = 86400
    shard: Shard = Shard()
    tick_s: float = 0.5
    max_unacked_requests: int = 50000
    max_dispatch_per_s: int = 2000
    client_id: str | None = None
    heartbeat: HeartbeatConfig = field(default=HeartbeatConfig("data/fleet-controller.heartbeat.json"), metadata=FLAT)
    metrics: MetricsConfig = field(default=MetricsConfig(port=9811), metadata=FLAT)

    def __post_init__(self) -> None:
        _check_intervals("schedule", self.schedule, off_allowed=False)
        if self.max_unacked_requests < 1:
            raise ConfigError("max_unacked_requests", "must be at least 1")
        if self.max_dispatch_per_s < 1:
            raise ConfigError("max_dispatch_per_s", "must be at least 1 request a second")


@dataclass(frozen=True)
class PersisterConfig:
    store: Literal["sqlite", "mongodb"] = "sqlite"
    sqlite_path: str = "data/fleet.db"
    mongodb_uri: str = "mongodb://localhost:27017"
    mongodb_database: str = "fleet"
    # raw answers, by the persister's clock: 7 days, processes 1 (the hourly trends keep the long view)
    retention_s: dict[str, int] = field(default_factory=lambda: {"default": 604800, "processes": 86400})
    trend_retention_s: int = 34560000  # hourly trends: 400 days
    batch_size: int = 500
    batch_wait_s: float = 0.2
    receive_maximum: int = 3000
    parse_workers: int | None = None  # None: one per core beyond the first, up to 4
    shared_subscription: bool = False
    share_group: str | None = None  # required when shared: a per-deployment secret (SHARE_GROUP_RE)
    session_expiry_s: int = 604800
    client_id: str | None = None
    expire_grace_s: float = 5.0
    sweep_interval_s: float = 5.0
    heartbeat: HeartbeatConfig = field(default=HeartbeatConfig("data/fleet-persister.heartbeat.json"), metadata=FLAT)
    metrics: MetricsConfig = field(default=MetricsConfig(port=9812), metadata=FLAT)

    def __post_init__(self) -> None:
        if "default" not in self.retention_s:
            raise ConfigError("retention_s.default", "is required")
        if self.trend_retention_s < 3600:
            raise ConfigError("trend_retention_s", f"{self.trend_retention_s} must be at least 3600 (one hour)")
        make_one = ("`fleetctl add-user NAME --role persister` writes the deployment's group into the config it "
                    "makes, or make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(18))'")
        if self.share_group is None:
            if self.shared_subscription:
                raise ConfigError("share_group", "is required when persister.shared_subscription is true: "
                                  "a secret group name shared by this deployment's persisters; " + make_one)
        elif not SHARE_GROUP_RE.match(self.share_group):
            raise ConfigError("share_group", "must be at least 16 characters of [A-Za-z0-9_-] "
                              "(a secret: any client that knows it can make messages go unstored); " + make_one)


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    refresh_s: float = 5.0
    stats_window_s: int = 900
    silent_after_s: int = 300
    ask_enabled: bool = False
    ask_timeout_s: float = 10.0
    operator_token: str | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    secure_cookies: bool = False  # served over HTTPS by a proxy: browsers send the sign-in cookie only over HTTPS
    # /metrics (docs/prometheus.md): None serves it when the dashboard listens on loopback only
    metrics_enabled: bool | None = None
    metrics_token: str | None = None  # when set, a scrape must send `Authorization: Bearer <token>`
    metrics_refresh_s: float = 15.0

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.metrics_refresh_s < 1:
            raise ConfigError("metrics_refresh_s", "must be at least 1 second")
        if self.ask_enabled and not self.operator_token:
            raise ConfigError("operator_token", "is required when dashboard.ask_enabled is true "
                              "(set FLEET_DASHBOARD_OPERATOR_TOKEN to a long random string)")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # any case
    format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        if self.level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("level", f"{self.level!r} must be debug, info, warning or error")


@dataclass(frozen=True)
class Config:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    persister: PersisterConfig = field(default_factory=PersisterConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = field(default=None, compare=False)

    def replace(self, section: str, **changes: Any) -> Config:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def get(self, key: str) -> Any:
        """The value of `key` as a user writes it: 'mqtt.port', 'mqtt.tls.enabled', 'persister.metrics_port'."""
        value: Any = self
        for part in key.split("."):
            flat = next((f.name for f in dataclasses.fields(value)
                         if f.metadata.get("flat") and part.startswith(f.name + "_")), None)
            value = getattr(getattr(value, flat), part[len(flat) + 1:]) if flat else getattr(value, part)
        return value


SECTIONS = {"mqtt": MqttConfig, "agent": AgentConfig, "controller": ControllerConfig,
            "persister": PersisterConfig, "dashboard": DashboardConfig, "log": LogConfig}
_UNIONS = (Union, getattr(types, "UnionType", Union))  # Optional[int], and int | None from Python 3.10


class _Pep604ToUnion(ast.NodeTransformer):
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, ast.BitOr):
            return node
        return ast.Subscript(ast.Name("__Union", ast.Load()), ast.Tuple([node.left, node.right], ast.Load()),
                             ast.Load())


def eval_annotation(text: str, namespace: Mapping[str, Any]) -> Any:
    """`text` (a postponed annotation) as a type, with `a | b` read as Union[a, b]: Python 3.9 cannot
    evaluate `int | None` itself, even where `from __future__ import annotations` let it be written."""
    tree = ast.fix_missing_locations(_Pep604ToUnion().visit(ast.parse(text, mode="eval")))
    return eval(compile(tree, "<annotation>", "eval"), {**namespace, "__Union": Union})


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    """The type of each field of the dataclass `cls`, however its annotation is spelled."""
    try:
        return typing.get_type_hints(cls)
    except TypeError:
        if sys.version_info >= (3, 10):
            raise
    return postponed_hints(cls)


def postponed_hints(cls: Any) -> dict[str, Any]:
    """get_type_hints for Python 3.9, through eval_annotation."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules[klass.__module__])
        for name, text in vars(klass).get("__annotations__", {}).items():
            hints[name] = eval_annotation(text, namespace) if isinstance(text, str) else text
    return hints


def _keys(cls: Any) -> dict[str, Any]:
    """The keys a user writes for `cls` -> their types; a FLAT field's keys are spelled `<field>_<key>`."""
    hints = _hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            keys.update({f"{f.name}_{inner}": tp for inner, tp in _keys(hints[f.name]).items()})
        else:
            keys[f.name] = hints[f.name]
    return keys


def _one_of(options: Any) -> str:
    shown = [repr(o) for o in options]
    return " or ".join(shown) if len(shown) < 3 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise AssertionError(f"config type {tp!r}: only Optional[X] unions are supported")
        return _coerce(key, inner[0], value)
    if value is None:
        raise ConfigError(key, "must not be empty")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"{value!r} must be {_one_of(args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, not {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, not {value!r}")
        if tp is int and value != int(value):
            raise ConfigError(key, f"must be a whole number, not {value!r}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, not {value!r}")
        return tp(value)
    parse = getattr(tp, "parse", None)  # a value written as text, like Shard's "0/1"
    if isinstance(value, (dict, list)) and (tp is str or parse):
        raise ConfigError(key, f"must be a single value, not {type(value).__name__}")
    if tp is str:
        return str(value)
    if parse:
        try:
            return parse(str(value))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a mapping of name: value")
        return {_coerce(key, args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, "must be a list")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise AssertionError(f"unhandled config type {tp!r}")


def _build(cls: Any, raw: Any, where: str, join: str = ".") -> Any:
    """A `cls` from the mapping `raw`, whose keys the user wrote as `<where><join><key>`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a mapping of keys")
    keys, hints, values = _keys(cls), _hints(cls), {}
    unknown = next((name for name in raw if name not in keys), None)
    if unknown is not None:
        raise ConfigError(f"{where}{join}{unknown}", f"unknown key; known keys in '{where}': {', '.join(sorted(keys))}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            mine = {k[len(f.name) + 1:]: v for k, v in raw.items() if k.startswith(f.name + "_")}
            if mine:  # else the section's own default
                values[f.name] = _build(hints[f.name], {**vars(f.default), **mine},
                                        f"{where}{join}{f.name}", "_")
        elif f.name in raw:
            values[f.name] = _coerce(f"{where}{join}{f.name}", hints[f.name], raw[f.name])
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}{join}{exc.key}", exc.problem) from None


def _is_text(tp: Any) -> bool:
    """Keys whose environment value is taken as written (a password of digits stays a string)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in _UNIONS and len(args) == 1:
        return _is_text(args[0])
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in args)
    return tp is str or hasattr(tp, "parse")


def _env_overrides(env: Mapping[str, str], sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """FLEET_MQTT_PORT=1884 -> {"mqtt": {"port": 1884}}; FLEET_MQTT_TLS_ENABLED -> mqtt.tls.enabled.
    Text for string keys, else YAML: 1884, true, null."""
    out: dict[str, dict[str, Any]] = {}
    for name, text in env.items():
        if not name.startswith("FLEET_"):
            continue
        rest = name[len("FLEET_"):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue  # FLEET_TEST_* and the like belong to other tools
        key, keys, where = rest[len(section) + 1:], _keys(sections[section]), out.setdefault(section, {})
        nested = next((k for k, tp in keys.items() if dataclasses.is_dataclass(tp) and key.startswith(k + "_")), None)
        if nested:
            key, keys, where = key[len(nested) + 1:], _keys(keys[nested]), where.setdefault(nested, {})
        if key not in keys:
            raise ConfigError(f"{section}.{key}", f"unknown key (from environment variable {name})")
        if typing.get_args(keys[key]) == (str, str):  # a map of text to text, replaced whole:
            try:  # FLEET_AGENT_LABELS="role=web,dc=ams" (or YAML: "{role: web}")
                loaded = yaml.safe_load(text) if text.lstrip().startswith("{") else parse_pairs(text)
            except (ValueError, yaml.YAMLError) as exc:
                raise ConfigError(f"{section}.{key}", f"{exc} (from environment variable {name}; "
                                                      "write key=value,key=value)") from None
            where[key] = Whole(loaded) if isinstance(loaded, dict) else loaded
            continue
        where[key] = text if _is_text(keys[key]) else yaml.safe_load(text) if text != "" else None
    return out


class Whole(dict):  # type: ignore[type-arg]
    """A map from the environment that replaces the file's whole, not key by key."""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not isinstance(value, Whole):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                required: bool = False) -> Config:
    """Read `path` (default ./config.yaml; a missing default file means built-in defaults),
    apply environment overrides, check every key, and return a frozen Config."""
    env = os.environ if env is None else env
    file = Path(path or "config.yaml")
    raw: dict[str, Any] = {}
    if file.exists():
        loaded = _load_yaml(file)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(file), "must hold a mapping of sections")
        raw = loaded or {}
    elif path is not None or required:
        raise ConfigError("--config", f"file {str(file)!r} does not exist")
    return Config(**build_sections(raw, env), source=str(file) if file.exists() else None)


def _load_yaml(file: Path) -> Any:
    """The config file's YAML; ConfigFileError, one line naming the file (and the line) and what
    is wrong, if it is a directory, unreadable, not UTF-8 or not YAML."""
    if file.is_dir():
        raise ConfigFileError(str(file), "is a directory, not a config file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(str(file), f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                         f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigFileError(str(file), f"cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigFileError(str(file), f"{problem} (not valid YAML)",
                              None if mark is None else mark.line + 1) from None


def build_sections(raw: Mapping[str, Any], env: Mapping[str, str],
                   sections: Mapping[str, Any] = SECTIONS) -> dict[str, Any]:
    """Each of `sections` (name -> dataclass) from `raw`, the file's mapping, and FLEET_* in `env`."""
    merged = _merge(dict(raw), _env_overrides(env, sections))
    unknown = next((name for name in merged if name not in sections), None)
    if unknown is not None:
        raise ConfigError(unknown, f"unknown section; known sections: {', '.join(sections)}")
    return {name: _build(cls, merged.get(name), name) for name, cls in sections.items()}
