"""Payload types of the wire contract and their validation.

`parse_*` take the raw MQTT payload and the parsed topic, and either return a
typed message or raise ContractError with a short, stable `reason` (it is what
the persister writes into `rejected.reason`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from .errors import ContractError
from .labels import check_labels
from .timefmt import is_canonical, is_valid_id, iso, now_iso, parse_iso
from .topics import ParsedTopic, check_agent_id, check_type

VERSION = 1
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
ERROR_CODES = ("unknown_type", "bad_request", "expired", "collector_failed", "timeout")
STATUSES = ("ok", "error")

JsonObject = dict[str, Any]


def dumps(obj: JsonObject) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


INT_RANGE = (-(2 ** 63), 2 ** 64)  # what orjson reads as an int; beyond it, a float, in both parsers
_INF = float("inf")


def _finite(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):
        raise ContractError("bad_number", f"{text[:40]} does not fit a 64-bit float")
    return value


def _int(text: str) -> Any:
    value = int(text)
    return value if INT_RANGE[0] <= value < INT_RANGE[1] else _finite(text)


def _unique(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ContractError("duplicate_key", f"key {twice[:60]!r} appears twice in one object")
    return obj


def _loads_stdlib(payload: bytes) -> Any:
    """The reference parser: what a payload may be, and why it is refused when it is not.

    A key may appear once per object (RFC 8259 leaves repeats to each parser, and parsers
    differ on which one counts: a message must not mean one thing here and another elsewhere)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", str(exc)) from None
    try:
        obj = json.loads(text, parse_constant=_no_constants, parse_float=_finite, parse_int=_int,
                         object_pairs_hook=_unique)
    except RecursionError:
        raise ContractError("too_deep", f"nesting deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise ContractError("bad_json", str(exc)) from None
    if "\\u" in text:  # an escaped lone surrogate ("\ud800") is valid JSON but no UTF-8 text
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ContractError("not_utf8", f"a string holds a lone surrogate ({exc.reason})") from None
    return obj


try:  # orjson where it is installed (the persister requires it); the agent stays on the stdlib
    import orjson

    def _loads(payload: bytes) -> Any:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson refuses exactly what the reference parser refuses; that one says why
            _loads_stdlib(payload)
            raise ContractError("bad_json", str(exc)) from None
        return obj

    def unique_keys(payload: bytes, obj: JsonObject, data_text: bytes | None = None) -> None:
        """ContractError("duplicate_key") if `payload` repeats a key in some object of `obj`, its
        parse. orjson keeps the last of repeated keys without a word. Every key in JSON text is
        followed by a colon, and so is every key orjson writes back, while colons inside strings
        are the same in both unless the text escapes one (\\u003a): so the two hold as many
        colons exactly when no key was dropped. With any \\u escape the reference parser decides.
        `data_text`: obj["data"] as orjson wrote it, when the caller has it anyway."""
        if payload.find(b"\\") >= 0 and b"\\u" in payload:  # find: one byte is a fast search
            _loads_stdlib(payload)
            return
        if data_text is None:
            colons = orjson.dumps(obj).count(b":")
        else:  # the rest of the envelope, and the colon after "data"
            rest = {k: v for k, v in obj.items() if k != "data"}
            colons = orjson.dumps(rest).count(b":") + 1 + data_text.count(b":")
        if payload.count(b":") != colons:
            _loads_stdlib(payload)  # raises duplicate_key, naming it

    JSON_PARSER = "orjson"
except ImportError:  # pragma: no cover - depends on what is installed
    _loads = _loads_stdlib
    JSON_PARSER = "json"

    def unique_keys(payload: bytes, obj: JsonObject, data_text: bytes | None = None) -> None:
        """The reference parser refuses repeated keys as it parses."""


def decode_object(payload: bytes, check_keys_unique: bool = True) -> JsonObject:
    """UTF-8 JSON object of bounded size and depth, with keys a document store accepts.

    No NaN or infinity, no lone surrogate, no key twice in one object, integers within 64 bits
    (larger ones become floats):
    everything that passes can be written to SQLite and MongoDB as it is."""
    if len(payload) == 0:
        raise ContractError("empty_payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    obj = _loads(payload)
    if not isinstance(obj, dict):
        raise ContractError("not_object", f"payload is a JSON {type(obj).__name__}, not an object")
    _check_parsed(obj, payload)
    if check_keys_unique and _loads is not _loads_stdlib:  # else the caller calls unique_keys()
        unique_keys(payload, obj)
    return obj


_GOOD_KEYS: set[str] = set()  # keys already found acceptable: most documents repeat the same few
_GOOD_KEYS_MAX = 4096


def check_document(value: Any, depth: int = 0) -> None:
    """Reject nesting deeper than MAX_DEPTH, NaN, and keys that break document stores ($x, a.b);
    `depth` is how deep `value` already sits."""
    _check(value, depth, True)


class _Seen:
    """What a walk of a parsed payload has met: the objects and arrays it counted, and the tables
    whose cells it left for later (see _check_parsed)."""

    __slots__ = ("dicts", "lists", "tables")

    def __init__(self) -> None:
        self.dicts, self.lists = 0, 0
        self.tables: list[tuple[Any, int]] = []


def _check_parsed(obj: Any, payload: bytes) -> None:
    """_check for a payload just parsed from `payload`, where a table's cells are looked at only
    if they may hold an object or array. Every object in the text begins with a `{` and every
    array with a `[` (strings may hold more), so when the walk has counted as many of each as the
    text holds, no cell can be one: checking a 250-row processes table's 2,250 cells was as costly
    as parsing them. Duplicate keys or brackets in strings make the counts differ; then the cells
    are checked as before."""
    seen = _Seen()
    _check(obj, 0, False, seen)
    if seen.tables and (payload.count(b"{") != seen.dicts or payload.count(b"[") != seen.lists):
        for items, depth in seen.tables:
            _check_cells(items, depth, False)


def _check(value: Any, depth: int, floats: bool, seen: _Seen | None = None) -> None:
    # This runs on every message the persister takes; a processes answer is a table of 250
    # objects of a dozen scalars. Per container, the keys are one C-level subset test against keys
    # already found good, the values one set of their types, and only containers recurse; a list
    # of objects (a table) is done in bulk. `floats` is off for parsed payloads, whose parser
    # has already refused NaN.
    if depth > MAX_DEPTH:
        raise ContractError("too_deep", f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        if seen is not None:
            seen.dicts += 1
        _check_keys(value.keys())
        items: Any = value.values()
    elif isinstance(value, list):
        if seen is not None:
            seen.lists += 1
        items = value
    else:
        _check_floats((value,), floats)
        return
    kinds = set(map(type, items))
    if kinds <= _SCALARS:
        _check_floats(items, floats)
        return
    if kinds == _DICT and depth < MAX_DEPTH:  # a table: its rows' keys at once, then its cells
        _check_keys(set().union(*items))
        if seen is None:
            _check_cells(items, depth, floats)
        else:
            seen.dicts += len(items)
            seen.tables.append((items, depth))
        return
    for item in items:
        if isinstance(item, (dict, list)):
            _check(item, depth + 1, floats, seen)
        elif floats and type(item) is float and item != item:
            raise ContractError("bad_number", "NaN is not JSON")


def _check_cells(rows: Any, depth: int, floats: bool) -> None:
    """The cells of a table whose rows (at depth + 1) are known to be objects with good keys."""
    cells = set(map(type, chain.from_iterable(map(dict.values, rows))))
    if floats and float in cells:
        _check_floats(chain.from_iterable(map(dict.values, rows)), floats)
    if not cells <= _SCALARS:
        for cell in chain.from_iterable(map(dict.values, rows)):
            if isinstance(cell, (dict, list)):
                _check(cell, depth + 2, floats)


def _check_keys(keys: Set[str]) -> None:
    if keys <= _GOOD_KEYS:
        return
    for key in keys:
        if key[:1] == "$" or "." in key or "\x00" in key:
            raise ContractError("bad_key", f"key {key[:60]!r} starts with '$' or contains '.'")
    if len(_GOOD_KEYS) < _GOOD_KEYS_MAX:
        _GOOD_KEYS.update(k for k in keys if len(k) <= 64)


def _check_floats(values: Iterable[Any], floats: bool) -> None:
    if floats and any(type(v) is float and v != v for v in values):
        raise ContractError("bad_number", "NaN is not JSON")


_SCALARS = {str, int, float, bool, type(None)}
_DICT = {dict}


def _no_constants(name: str) -> Any:
    raise ContractError("bad_number", f"{name} is not JSON")


def _version(obj: JsonObject) -> int:
    v = obj.get("v", VERSION)
    if v != VERSION or isinstance(v, bool):
        raise ContractError("bad_version", f"v={v!r}; this build speaks v={VERSION}")
    return VERSION


def _id(obj: JsonObject) -> str:
    value = obj.get("id")
    if not is_valid_id(value):
        raise ContractError("bad_id", f"id {str(value)[:80]!r} is not 1-64 characters of [A-Za-z0-9_-]")
    return str(value)


def _same(obj: JsonObject, key: str, expected: str) -> str:
    value = obj.get(key, expected)
    if value != expected:
        raise ContractError(f"{key}_mismatch", f"payload says {key}={str(value)[:80]!r}, topic says {expected!r}")
    return expected


# How far a sender's timestamp may lie from the receiver's clock (`now_s`) before the message
# is refused (bad_timestamp): a day ahead, 30 days behind (an agent's outbox after a long outage
# stays inside that; the broker forgets a session after 7 days). A request may expire up to a
# year ahead (the longest interval a schedule may have), and a status's ts may be any age: a
# Last Will carries the time of the connect that armed it, and a retained one lives on.
FUTURE_S = 86400.0
PAST_S = 30 * 86400.0
EXPIRES_FUTURE_S = 366 * 86400.0
MAX_DURATION_MS = 86400000.0
UNBOUNDED = float("inf")


def _opt_ts(obj: JsonObject, key: str, now_s: float | None, past_s: float = PAST_S,
            future_s: float = FUTURE_S) -> str | None:
    """The timestamp at `key` as canonical text (UTC, milliseconds), checked against the window
    around `now_s` when one is given."""
    value = obj.get(key)
    if value is None:
        return None
    at = parse_iso(value)
    if now_s is not None and not now_s - past_s <= at <= now_s + future_s:
        ahead = at > now_s
        limit = future_s if ahead else past_s
        raise ContractError("bad_timestamp", f"{key} {str(value)[:40]!r} is more than {_span(limit)} "
                                             f"{'ahead of' if ahead else 'behind'} this receiver's clock")
    return value if is_canonical(value) else iso(at)


def _span(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} day{'s' if days != 1 else ''}"


def _number(obj: JsonObject, key: str, low: float, high: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"bad_{key}", f"{key} must be a number")
    if not low <= value <= high:
        raise ContractError(f"bad_{key}", f"{key} {value!r} is outside {low:g} to {high:g}")
    return float(value)


_PLAIN = re.compile(r"[A-Za-z0-9_.:+-]*")


@dataclass(frozen=True)
class Request:
    id: str
    type: str
    params: JsonObject = field(default_factory=dict)
    issued_at: str | None = None
    expires_at: str | None = None
    v: int = VERSION
    job: str | None = None  # the job (fleetctl request --all|--label) this request is part of

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"v": self.v, "id": self.id, "type": self.type, "params": self.params,
                           "issued_at": self.issued_at, "expires_at": self.expires_at}
        if self.job is not None:
            out["job"] = self.job
        return out

    def payload(self) -> bytes:
        # The controller sends thousands a second (a job, one per agent), nearly all with no params
        # and fields that need no escaping; those are formatted directly, to the bytes dumps() writes.
        if not self.params and type(self.v) is int and _PLAIN.fullmatch(
                f"{self.id}{self.type}{self.issued_at or ''}{self.expires_at or ''}{self.job or ''}"):
            issued = "null" if self.issued_at is None else f'"{self.issued_at}"'
            expires = "null" if self.expires_at is None else f'"{self.expires_at}"'
            job = "" if self.job is None else f',"job":"{self.job}"'
            return (f'{{"v":{self.v},"id":"{self.id}","type":"{self.type}","params":{{}},'
                    f'"issued_at":{issued},"expires_at":{expires}{job}}}').encode()
        return dumps(self.to_dict())

    def is_expired(self, now_s: float) -> bool:
        return self.expires_at is not None and parse_iso(self.expires_at) <= now_s


def parse_request(payload: bytes, topic: ParsedTopic, now_s: float | None = None) -> Request:
    """A request on `topic`; with `now_s` (the receiver's clock), its times must lie near it."""
    obj = decode_object(payload)
    assert topic.type is not None
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ContractError("bad_params", "params must be an object")
    return Request(
        v=_version(obj), id=_id(obj), type=_same(obj, "type", topic.type), params=params,
        issued_at=_opt_ts(obj, "issued_at", now_s),
        expires_at=_opt_ts(obj, "expires_at", now_s, future_s=EXPIRES_FUTURE_S), job=_job(obj),
    )


def _job(obj: JsonObject) -> str | None:
    """The request's job id, absent or null for none. Anything else is refused (bad_job): a
    persister makes the request a dead letter rather than store it under a job it cannot name."""
    value = obj.get("job")
    if value is None:
        return None
    if not is_valid_id(value):
        raise ContractError("bad_job", f"job {str(value)[:80]!r} is not 1-64 characters of [A-Za-z0-9_-]")
    return str(value)


@dataclass(frozen=True)
class Response:
    id: str
    agent_id: str
    type: str
    status: str
    data: JsonObject | None = None
    error: JsonObject | None = None
    collected_at: str = field(default_factory=now_iso)
    duration_ms: float | None = None
    v: int = VERSION

    @classmethod
    def ok(cls, req_id: str, agent_id: str, type_: str, data: JsonObject, duration_ms: float) -> Response:
        return cls(id=req_id, agent_id=agent_id, type=type_, status="ok", data=data,
                   duration_ms=round(duration_ms, 3))

    @classmethod
    def fail(cls, req_id: str, agent_id: str, type_: str, code: str, message: str,
             duration_ms: float | None = None) -> Response:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        return cls(id=req_id, agent_id=agent_id, type=type_, status="error",
                   error={"code": code, "message": message}, duration_ms=duration_ms)

    def to_dict(self) -> JsonObject:
        return {"v": self.v, "id": self.id, "agent_id": self.agent_id, "type": self.type,
                "status": self.status, "data": self.data, "error": self.error,
                "collected_at": self.collected_at, "duration_ms": self.duration_ms}

    def payload(self) -> bytes:
        return dumps(self.to_dict())


def ok_response_payload(req_id: str, agent_id: str, type_: str, data_json: bytes, duration_ms: float,
                        collected_at: str | None = None) -> bytes:
    """The bytes of Response.ok(...).payload() around data already serialised: `data_json` is a
    JSON object as dumps() writes it. The simulator's answers are pre-serialised (a 40 KB
    processes table), and parsing and dumping them again would double what an answer costs.
    `collected_at` defaults to now."""
    if data_json[:1] != b"{":
        raise ValueError("data_json must be a serialised JSON object")
    at = now_iso() if collected_at is None else collected_at
    ms = round(duration_ms, 3)
    text = f"{req_id}{agent_id}{type_}{at}"
    # Printable ASCII with no quote or backslash is what dumps() writes between quotes unchanged;
    # a duration parse_response accepts is a finite number, written alike by both.
    if (0.0 <= ms <= MAX_DURATION_MS and text.isascii() and text.isprintable()
            and '"' not in text and "\\" not in text):
        return b"".join((f'{{"v":{VERSION},"id":"{req_id}","agent_id":"{agent_id}","type":"{type_}",'
                         '"status":"ok","data":'.encode(), data_json,
                         f',"error":null,"collected_at":"{at}","duration_ms":{ms!r}}}'.encode()))
    head = dumps({"v": VERSION, "id": req_id, "agent_id": agent_id, "type": type_, "status": "ok"})[:-1]
    tail = dumps({"error": None, "collected_at": at, "duration_ms": ms})[1:]
    return b"".join((head, b',"data":', data_json, b",", tail))


def parse_response(payload: bytes, topic: ParsedTopic, now_s: float | None = None) -> Response:
    """A response on `topic`. Its envelope only: a built-in type's data is checked against
    fleet_common.datatypes by whoever stores it. With `now_s`, collected_at must lie near it."""
    return response_of(decode_object(payload), topic, now_s)


def response_of(obj: JsonObject, topic: ParsedTopic, now_s: float | None = None) -> Response:
    """parse_response for a payload already decoded (decode_object)."""
    assert topic.type is not None
    status = obj.get("status")
    if status not in STATUSES:
        raise ContractError("bad_status", f"status must be 'ok' or 'error', not {str(status)[:40]!r}")
    data, error = obj.get("data"), obj.get("error")
    if status == "ok":
        if not isinstance(data, dict):
            raise ContractError("bad_data", "an ok response needs data that is an object")
        if error is not None:
            raise ContractError("bad_error", "an ok response carries no error (error must be null)")
    else:
        if not isinstance(error, dict) or error.get("code") not in ERROR_CODES:
            raise ContractError("bad_error", f"an error response needs error.code in {', '.join(ERROR_CODES)}")
        if not isinstance(error.get("message", ""), str):
            raise ContractError("bad_error", "error.message must be a string")
        if data is not None:
            raise ContractError("bad_data", "an error response carries no data (data must be null)")
    return Response(
        v=_version(obj), id=_id(obj), agent_id=_same(obj, "agent_id", topic.agent_id),
        type=_same(obj, "type", topic.type), status=str(status), data=data, error=error,
        collected_at=_opt_ts(obj, "collected_at", now_s) or now_iso(),
        duration_ms=_number(obj, "duration_ms", 0.0, MAX_DURATION_MS),
    )


@dataclass(frozen=True)
class Status:
    agent_id: str
    online: bool
    ts: str = field(default_factory=now_iso)
    hostname: str | None = None
    platform: str | None = None
    agent_version: str | None = None
    types: list[str] | None = None
    labels: dict[str, str] | None = None
    extra: JsonObject = field(default_factory=dict)
    v: int = VERSION

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"v": self.v, "agent_id": self.agent_id, "online": self.online, "ts": self.ts}
        if self.online:
            out.update(hostname=self.hostname, platform=self.platform,
                       agent_version=self.agent_version, types=self.types)
            if self.labels:
                out["labels"] = self.labels
        out.update(self.extra)
        return out

    def payload(self) -> bytes:
        return dumps(self.to_dict())


MAX_TYPES = 256
STATUS_STRINGS = {"hostname": 255, "platform": 255, "agent_version": 64}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_status(payload: bytes, topic: ParsedTopic, now_s: float | None = None) -> Status:
    """A birth or Last Will on `topic`. Its strings are short and printable, its types distinct
    type names; with `now_s`, its ts may not lie ahead of it (any age is fine, see PAST_S)."""
    obj = decode_object(payload)
    online = obj.get("online")
    if not isinstance(online, bool):
        raise ContractError("bad_online", "online must be true or false")
    types = obj.get("types")
    if types is not None:
        if not isinstance(types, list):
            raise ContractError("bad_types", "types must be a list of type names")
        if len(types) > MAX_TYPES:
            raise ContractError("bad_types", f"{len(types)} types; an agent may advertise at most {MAX_TYPES}")
        types = [check_type(t) for t in types]
        if len(set(types)) != len(types):
            raise ContractError("bad_types", "a type is listed twice")
    strings = {}
    for key, longest in STATUS_STRINGS.items():
        value = obj.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ContractError(f"bad_{key}", f"{key} must be a string")
            if len(value) > longest or _CONTROL.search(value):
                raise ContractError(f"bad_{key}", f"{key} must be at most {longest} characters, "
                                                  "none of them control characters")
        strings[key] = value
    labels = obj.get("labels")
    if labels is not None:
        labels = check_labels(labels)
    known = {"v", "agent_id", "online", "ts", "types", "labels", *strings}
    return Status(
        v=_version(obj), agent_id=_same(obj, "agent_id", check_agent_id(topic.agent_id)), online=online,
        ts=_opt_ts(obj, "ts", now_s, past_s=UNBOUNDED) or now_iso(), types=types, labels=labels,
        extra={k: v for k, v in obj.items() if k not in known}, **strings,
    )
