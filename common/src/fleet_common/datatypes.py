"""The built-in request types: each one's `params` and `data`, defined once.

Everything that needs a built-in type's shape reads it here: the agent checks a request's
params (and fills their defaults), the persister refuses an answer whose data does not
conform (`bad_data`, naming the field), the simulator's readings are tested against it, the
dashboard relies on it, and docs/asyncapi.yaml carries the JSON Schema that `json_schema()`
makes from it (tests/test_asyncapi.py compares the two).

A shape says which fields are required and the JSON type of each field it names; fields it
does not name are allowed (agents may add readings), and so is `null` where a platform may
not have a reading (`nullable`). The checker here is the reference, in plain Python for the
agent (it checks params); the persister checks data with the same shapes compiled to msgspec
(fleet_persister.datacheck), and asks this one only to say what is wrong.

Types beyond these (collectors registered by name) keep the envelope checks only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ContractError

JsonObject = dict[str, Any]
Check = Callable[[Any, str], None]

_NONE = type(None)
_TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})\Z")
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "an array", _NONE: "null"}


def _what(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def _fail(path: str, problem: str) -> ContractError:
    return ContractError("bad_data", f"{path} {problem}")


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """A JSON value's shape. `nullable`: null is allowed too."""

    nullable: bool = False

    # what the value may be, for the column-wise check of a table
    def kinds(self) -> frozenset[type]:
        raise NotImplementedError

    def schema(self) -> JsonObject:
        raise NotImplementedError

    def checker(self) -> Check | None:
        """A check beyond the value's type (bounds, pattern, nested fields); None if the type is all."""
        return None

    def _typed(self, schema: JsonObject) -> JsonObject:
        if self.nullable:
            schema = dict(schema, type=[schema["type"], "null"])
        return schema

    def _expected(self) -> str:
        raise NotImplementedError

    def compile(self) -> Check:
        """check(value, path): raise ContractError("bad_data", "<path> ...") if value does not conform."""
        kinds, extra = self.kinds() | ({_NONE} if self.nullable else set()), self.checker()
        expected = self._expected() + (" or null" if self.nullable else "")

        def check(value: Any, path: str) -> None:
            if type(value) not in kinds:
                raise _fail(path, f"is {_what(value)}, not {expected}")
            if extra is not None and value is not None:
                extra(value, path)

        return check


@dataclass(frozen=True)
class Str(Shape):
    enum: tuple[str, ...] = ()
    max_length: int | None = None

    def kinds(self) -> frozenset[type]:
        return frozenset({str})

    def _expected(self) -> str:
        return "a string"

    def schema(self) -> JsonObject:
        out: JsonObject = {"type": "string"}
        if self.enum:
            out["enum"] = list(self.enum)
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        return self._typed(out)

    def checker(self) -> Check | None:
        if not self.enum and self.max_length is None:
            return None
        enum, longest = frozenset(self.enum), self.max_length

        def check(value: Any, path: str) -> None:
            if enum and value not in enum:
                raise _fail(path, f"is {value[:40]!r}, not one of {', '.join(self.enum)}")
            if longest is not None and len(value) > longest:
                raise _fail(path, f"is {len(value)} characters long, more than {longest}")

        return check


@dataclass(frozen=True)
class Timestamp(Shape):
    """RFC 3339 text, as the agent writes times inside data (boot_time, users[].started)."""

    def kinds(self) -> frozenset[type]:
        return frozenset({str})

    def _expected(self) -> str:
        return "an RFC 3339 timestamp"

    def schema(self) -> JsonObject:
        return self._typed({"type": "string", "format": "date-time"})

    def checker(self) -> Check | None:
        def check(value: Any, path: str) -> None:
            if not _TS_RE.match(value):
                raise _fail(path, f"is {value[:40]!r}, not an RFC 3339 timestamp")

        return check


@dataclass(frozen=True)
class Num(Shape):
    """A number; with `integer`, a JSON integer (written without fraction or exponent)."""

    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False

    def kinds(self) -> frozenset[type]:
        return frozenset({int} if self.integer else {int, float})

    def _expected(self) -> str:
        return "an integer" if self.integer else "a number"

    def schema(self) -> JsonObject:
        out: JsonObject = {"type": "integer" if self.integer else "number"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return self._typed(out)

    def checker(self) -> Check | None:
        low, high = self.minimum, self.maximum
        if low is None and high is None:
            return None

        def check(value: Any, path: str) -> None:
            if low is not None and value < low:
                raise _fail(path, f"is {value!r}, below {low:g}")
            if high is not None and value > high:
                raise _fail(path, f"is {value!r}, above {high:g}")

        return check


def Int(minimum: float | None = 0, maximum: float | None = None, nullable: bool = False) -> Num:
    """A whole number, by default not negative (counters, sizes, ids)."""
    return Num(nullable=nullable, minimum=minimum, maximum=maximum, integer=True)


def Percent(nullable: bool = False) -> Num:
    return Num(nullable=nullable, minimum=0, maximum=100)


@dataclass(frozen=True)
class Bool(Shape):
    def kinds(self) -> frozenset[type]:
        return frozenset({bool})

    def _expected(self) -> str:
        return "true or false"

    def schema(self) -> JsonObject:
        return self._typed({"type": "boolean"})


@dataclass(frozen=True)
class Field:
    shape: Shape
    required: bool = True
    default: Any = None
    description: str = ""


def req(shape: Shape, description: str = "") -> Field:
    return Field(shape, True, None, description)


def opt(shape: Shape, default: Any = None, description: str = "") -> Field:
    """A field that may be missing (or null); `default` is what a missing param means."""
    return Field(shape, False, default, description)


@dataclass(frozen=True)
class Obj(Shape):
    """An object with these fields, and any others; or, with `values` (and no fields), a map
    whose every value has that shape (times_percent: {"user": 12.0, ...})."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    values: Shape | None = None
    # A field that is not required may be missing, and in data also null (a reading a platform
    # lacks); params are strict: a param given as null is refused.
    strict: bool = False

    def kinds(self) -> frozenset[type]:
        return frozenset({dict})

    def _expected(self) -> str:
        return "an object"

    def schema(self) -> JsonObject:
        out: JsonObject = {"type": "object"}
        required = [name for name, f in self.fields.items() if f.required]
        if required:
            out["required"] = required
        if self.fields:
            props = {}
            for name, f in self.fields.items():
                prop = f.shape.schema()
                if not f.required and not f.shape.nullable and not self.strict:  # a missing reading, sent as null
                    prop = dict(prop, type=[prop["type"], "null"])
                if f.default is not None:
                    prop["default"] = f.default
                if f.description:
                    prop["description"] = f.description
                props[name] = prop
            out["properties"] = props
        out["additionalProperties"] = self.values.schema() if self.values is not None else True
        return self._typed(out)

    def checker(self) -> Check | None:
        fields = [(name, f.required, f.shape.compile()) for name, f in self.fields.items()]
        values = self.values.compile() if self.values is not None else None
        strict = self.strict

        def check(value: Any, path: str) -> None:
            for name, required, check_field in fields:
                item = value.get(name)
                if item is None:
                    if name not in value:
                        if required:
                            raise _fail(path, f"has no {name!r}")
                        continue
                    if not required and not strict:
                        continue
                check_field(item, f"{path}.{name}")
            if values is not None:
                for key, item in value.items():
                    values(item, f"{path}.{key}")

        return check


@dataclass(frozen=True)
class Arr(Shape):
    items: Shape = field(default_factory=Shape)
    max_items: int | None = None

    def kinds(self) -> frozenset[type]:
        return frozenset({list})

    def _expected(self) -> str:
        return "an array"

    def schema(self) -> JsonObject:
        out: JsonObject = {"type": "array", "items": self.items.schema()}
        if self.max_items is not None:
            out["maxItems"] = self.max_items
        return self._typed(out)

    def checker(self) -> Check | None:
        longest, each = self.max_items, self.items.compile()

        def check(value: Any, path: str) -> None:
            if longest is not None and len(value) > longest:
                raise _fail(path, f"has {len(value)} items, more than {longest}")
            for i, item in enumerate(value):
                each(item, f"{path}[{i}]")

        return check


# ----------------------------------------------------------------------------- the types

@dataclass(frozen=True)
class DataType:
    """One built-in request type: its params, the data of an ok answer, and how large an answer
    of it may be (a cpu answer is under 2 KB; one of 3 MB is not a cpu answer)."""

    name: str
    description: str
    params: Obj
    data: Obj
    max_payload_bytes: int
    _checks: tuple[Check, Check] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checks", (self.params.compile(), self.data.compile()))

    def check_params(self, params: JsonObject) -> JsonObject:
        """The params with their defaults filled in; ContractError("bad_params", ...) naming the
        param if one is unknown or has the wrong type or value."""
        unknown = sorted(set(params) - set(self.params.fields))
        if unknown:
            known = ", ".join(self.params.fields) or "none"
            raise ContractError("bad_params", f"unknown param(s) {', '.join(repr(k)[:40] for k in unknown)}; "
                                              f"{self.name} accepts: {known}")
        try:
            self._checks[0](params, "params")
        except ContractError as exc:
            raise ContractError("bad_params", exc.detail) from None
        return {**{k: f.default for k, f in self.params.fields.items() if f.default is not None}, **params}

    def check_data(self, data: JsonObject, payload_bytes: int = 0) -> None:
        """ContractError("bad_data", "data.<path> ...") if `data` is not this type's data."""
        if payload_bytes > self.max_payload_bytes:
            raise ContractError("bad_data", f"a {self.name} answer of {payload_bytes} bytes is larger than the "
                                            f"{self.max_payload_bytes} bytes one may be")
        self._checks[1](data, "data")


KiB = 1024
NO_PARAMS = Obj(strict=True)
SORT_KEYS = ("cpu_percent", "rss", "create_time", "pid", "name")
MAX_PROCESS_LIMIT = 10000

COUNTERS = ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "errin", "errout", "dropin", "dropout")
_SIZES = {"total": req(Int(nullable=True)), "used": req(Int(nullable=True)), "free": req(Int(nullable=True)),
          "percent": req(Percent(nullable=True))}

BUILTIN: dict[str, DataType] = {t.name: t for t in (
    DataType("os_info", "Host name, operating system, boot time, CPU count and logged-in users.", NO_PARAMS,
             Obj(fields={
        "hostname": req(Str()), "os": req(Str()), "release": req(Str()), "version": req(Str()), "arch": req(Str()),
        "boot_time": req(Timestamp(nullable=True)), "uptime_s": req(Num(nullable=True, minimum=0)),
        "cpu_count": req(Int(nullable=True)),
        "users": req(Arr(items=Obj(fields={"name": req(Str()), "terminal": opt(Str()), "host": opt(Str()),
                                           "started": opt(Timestamp()), "pid": opt(Int())}))),
        "platform": opt(Str()), "cpu_count_physical": opt(Int()), "python_version": opt(Str()),
        "distro": opt(Obj(fields={"id": opt(Str()), "name": opt(Str()), "version_id": opt(Str()),
                                  "pretty_name": opt(Str())})),
    }), 256 * KiB),
    DataType("cpu", "Utilisation since the previous request, load average, frequency, context switches.",
             NO_PARAMS, Obj(fields={
                 "percent": req(Percent(), "busy share of all CPUs since the previous request"),
                 "per_cpu": req(Arr(nullable=True, items=Percent())),
                 "times_percent": req(Obj(values=Percent())),
                 "load_avg": req(Arr(nullable=True, items=Num(minimum=0), max_items=3)),
                 "freq_mhz": req(Obj(nullable=True, fields={"current": req(Num(minimum=0)), "min": opt(Num(minimum=0)),
                                                            "max": opt(Num(minimum=0))})),
                 "ctx_switches": req(Int(nullable=True)),
                 "interval_s": opt(Num(minimum=0)), "count": opt(Int()), "count_physical": opt(Int()),
                 "interrupts": opt(Int()),
             }), 256 * KiB),
    DataType("memory", "Virtual memory and swap, in bytes (percent in %).", NO_PARAMS, Obj(fields={
        "virtual": req(Obj(fields={"total": req(Int()), "available": req(Int()), "used": req(Int()),
                                   "percent": req(Percent()), "free": opt(Int())})),
        "swap": req(Obj(nullable=True, fields={"total": req(Int()), "used": req(Int()), "free": req(Int()),
                                               "percent": req(Percent())})),
    }), 64 * KiB),
    DataType("disk", "Mounted partitions with their usage (a list, never keyed by mount point) and I/O counters.",
             NO_PARAMS, Obj(fields={
                 "partitions": req(Arr(items=Obj(fields={"device": req(Str()), "mountpoint": req(Str()),
                                                         "fstype": req(Str()), **_SIZES, "opts": opt(Str())}))),
                 "io": req(Obj(nullable=True, values=Num(nullable=True))),
                 "io_per_disk": opt(Arr(items=Obj(fields={"name": req(Str())}))),
             }), 2048 * KiB),
    DataType("network", "Per-interface counters, state and addresses (a list, never keyed by interface name).",
             NO_PARAMS, Obj(fields={
                 "interfaces": req(Arr(items=Obj(fields={
                     "name": req(Str()), **{c: req(Int(nullable=True)) for c in COUNTERS},
                     "isup": opt(Bool()), "speed_mbps": opt(Int()), "mtu": opt(Int()), "duplex": opt(Str()),
                     "addresses": opt(Arr(items=Obj(fields={"family": req(Str()), "address": req(Str(nullable=True)),
                                                            "netmask": opt(Str())}))),
                 }))),
                 "totals": opt(Obj(values=Num(nullable=True))),
             }), 2048 * KiB),
    DataType("processes", "The top processes by CPU, memory, pid, name or start time, as a list.",
             Obj(strict=True, fields={
        "limit": opt(Int(minimum=1, maximum=MAX_PROCESS_LIMIT), 50, "how many processes to return"),
        "sort_by": opt(Str(enum=SORT_KEYS), "cpu_percent", "largest first, except pid and name (ascending)"),
    }), Obj(fields={
        "processes": req(Arr(items=Obj(fields={
            "pid": req(Int()), "ppid": req(Int(nullable=True)), "name": req(Str(nullable=True)),
            "username": req(Str(nullable=True)), "status": req(Str(nullable=True)),
            "cpu_percent": req(Num(nullable=True, minimum=0), "may exceed 100 for a process on several CPUs"),
            "rss": req(Int(nullable=True)), "create_time": req(Num(nullable=True, minimum=0)),
            "num_threads": opt(Int()),
        }), max_items=MAX_PROCESS_LIMIT)),
        "total": opt(Int()), "sort_by": opt(Str()), "limit": opt(Int()),
    }), 4096 * KiB),
    DataType("ping", "An empty answer: the requester measures liveness and round trip.", NO_PARAMS, Obj(), 4 * KiB),
)}


# One answer of each type, as the agent gives it on Linux (shortened): the AsyncAPI examples,
# and what tests start from.
EXAMPLES: dict[str, JsonObject] = {
    "os_info": {"hostname": "web-01", "os": "Linux", "release": "6.1.0-21-amd64", "version": "#1 SMP Debian",
                "platform": "Linux-6.1.0-21-amd64-x86_64-with-glibc2.36", "arch": "x86_64",
                "boot_time": "2026-11-20T08:00:00.000Z", "uptime_s": 513000.0, "cpu_count": 2,
                "users": [{"name": "admin", "terminal": "pts/0", "host": "10.0.0.5",
                           "started": "2026-11-26T03:00:00.000Z", "pid": 4242}]},
    "cpu": {"percent": 12.5, "per_cpu": [10.0, 15.0],
            "times_percent": {"user": 9.0, "system": 3.5, "idle": 87.5}, "load_avg": [0.4, 0.3, 0.2],
            "freq_mhz": {"current": 2596.1, "min": None, "max": None}, "ctx_switches": 5722927,
            "interval_s": 60.0, "count": 2},
    "memory": {"virtual": {"total": 8589934592, "available": 6442450944, "used": 1932735283, "percent": 25.0,
                           "free": 4294967296},
               "swap": {"total": 2147483648, "used": 0, "free": 2147483648, "percent": 0.0}},
    "disk": {"partitions": [{"device": "/dev/vda1", "mountpoint": "/", "fstype": "ext4", "opts": "rw,relatime",
                             "total": 270553174016, "used": 26872393728, "free": 229872455680, "percent": 10.5}],
             "io": {"read_count": 85095, "write_count": 270615, "read_bytes": 2291397632,
                    "write_bytes": 18037522432}},
    "network": {"interfaces": [{"name": "eth0", "bytes_sent": 511981, "bytes_recv": 329291410, "packets_sent": 5176,
                                "packets_recv": 8611, "errin": 0, "errout": 0, "dropin": 0, "dropout": 0,
                                "isup": True, "mtu": 1500,
                                "addresses": [{"family": "AF_INET", "address": "10.0.0.7",
                                               "netmask": "255.255.255.0"}]}]},
    "processes": {"processes": [{"pid": 1, "ppid": 0, "name": "systemd", "username": "root", "status": "sleeping",
                                 "cpu_percent": 0.0, "rss": 11345920, "create_time": 1796117551.25,
                                 "num_threads": 1}],
                  "total": 92, "sort_by": "cpu_percent", "limit": 50},
    "ping": {},
}


def example(name: str, **changes: Any) -> JsonObject:
    """A conforming answer's data of built-in type `name` (a deep copy), with `changes` applied."""
    return {**copy.deepcopy(EXAMPLES[name]), **changes}


def datatype(name: str) -> DataType | None:
    """The built-in type of that name, or None for a type this contract does not define."""
    return BUILTIN.get(name)


def json_schemas() -> dict[str, dict[str, JsonObject]]:
    """{type: {"params": schema, "data": schema}}: what docs/asyncapi.yaml carries."""
    return {name: {"params": dict(t.params.schema(), additionalProperties=False), "data": t.data.schema()}
            for name, t in BUILTIN.items()}


__all__ = ["BUILTIN", "EXAMPLES", "DataType", "datatype", "example", "json_schemas"]
