"""Payload types of the wire contract and their validation.

`parse_*` take the raw MQTT payload and the parsed topic, and either return a
typed message or raise ContractError with a short, stable `reason` (it is what
the persister writes into `rejected.reason`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import ContractError
from .timefmt import is_valid_id, now_iso, parse_iso
from .topics import ParsedTopic, check_agent_id, check_type

VERSION = 1
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
ERROR_CODES = ("unknown_type", "bad_request", "expired", "collector_failed", "timeout")
STATUSES = ("ok", "error")

JsonObject = Dict[str, Any]


def dumps(obj: JsonObject) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_object(payload: bytes) -> JsonObject:
    """UTF-8 JSON object of bounded size and depth, with keys a document store accepts."""
    if len(payload) == 0:
        raise ContractError("empty_payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", str(exc)) from None
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ContractError("too_deep", f"nesting deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise ContractError("bad_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise ContractError("not_object", f"payload is a JSON {type(obj).__name__}, not an object")
    check_document(obj)
    return obj


def check_document(value: Any, depth: int = 0) -> None:
    """Reject nesting deeper than MAX_DEPTH, NaN, and keys that break document stores ($x, a.b).

    Only containers recurse; scalars are checked in the loop. This runs on every message the
    persister takes, and a processes answer holds thousands of scalars."""
    if depth > MAX_DEPTH:
        raise ContractError("too_deep", f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        for key in value:
            if key[:1] == "$" or "." in key or "\x00" in key:
                raise ContractError("bad_key", f"key {key[:60]!r} starts with '$' or contains '.'")
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        if isinstance(value, float) and value != value:
            raise ContractError("bad_number", "NaN is not JSON")
        return
    for item in items:
        if isinstance(item, (dict, list)):
            check_document(item, depth + 1)
        elif item.__class__ is float and item != item:
            raise ContractError("bad_number", "NaN is not JSON")


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


def _opt_ts(obj: JsonObject, key: str) -> Optional[str]:
    value = obj.get(key)
    if value is None:
        return None
    parse_iso(value)
    return str(value)


def _number(obj: JsonObject, key: str) -> Optional[float]:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"bad_{key}", f"{key} must be a number")
    return float(value)


@dataclass(frozen=True)
class Request:
    id: str
    type: str
    params: JsonObject = field(default_factory=dict)
    issued_at: Optional[str] = None
    expires_at: Optional[str] = None
    v: int = VERSION

    def to_dict(self) -> JsonObject:
        return {"v": self.v, "id": self.id, "type": self.type, "params": self.params,
                "issued_at": self.issued_at, "expires_at": self.expires_at}

    def payload(self) -> bytes:
        return dumps(self.to_dict())

    def is_expired(self, now_s: float) -> bool:
        return self.expires_at is not None and parse_iso(self.expires_at) <= now_s


def parse_request(payload: bytes, topic: ParsedTopic) -> Request:
    obj = decode_object(payload)
    assert topic.type is not None
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ContractError("bad_params", "params must be an object")
    return Request(
        v=_version(obj), id=_id(obj), type=_same(obj, "type", topic.type), params=params,
        issued_at=_opt_ts(obj, "issued_at"), expires_at=_opt_ts(obj, "expires_at"),
    )


@dataclass(frozen=True)
class Response:
    id: str
    agent_id: str
    type: str
    status: str
    data: Optional[JsonObject] = None
    error: Optional[JsonObject] = None
    collected_at: str = field(default_factory=now_iso)
    duration_ms: Optional[float] = None
    v: int = VERSION

    @classmethod
    def ok(cls, req_id: str, agent_id: str, type_: str, data: JsonObject, duration_ms: float) -> Response:
        return cls(id=req_id, agent_id=agent_id, type=type_, status="ok", data=data,
                   duration_ms=round(duration_ms, 3))

    @classmethod
    def fail(cls, req_id: str, agent_id: str, type_: str, code: str, message: str,
             duration_ms: Optional[float] = None) -> Response:
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


def parse_response(payload: bytes, topic: ParsedTopic) -> Response:
    obj = decode_object(payload)
    assert topic.type is not None
    status = obj.get("status")
    if status not in STATUSES:
        raise ContractError("bad_status", f"status must be 'ok' or 'error', not {str(status)[:40]!r}")
    data, error = obj.get("data"), obj.get("error")
    if status == "ok":
        if not isinstance(data, dict):
            raise ContractError("bad_data", "an ok response needs data that is an object")
        error = None
    else:
        if not isinstance(error, dict) or error.get("code") not in ERROR_CODES:
            raise ContractError("bad_error", f"an error response needs error.code in {', '.join(ERROR_CODES)}")
        if not isinstance(error.get("message", ""), str):
            raise ContractError("bad_error", "error.message must be a string")
        data = None
    return Response(
        v=_version(obj), id=_id(obj), agent_id=_same(obj, "agent_id", topic.agent_id),
        type=_same(obj, "type", topic.type), status=str(status), data=data, error=error,
        collected_at=_opt_ts(obj, "collected_at") or now_iso(), duration_ms=_number(obj, "duration_ms"),
    )


@dataclass(frozen=True)
class Status:
    agent_id: str
    online: bool
    ts: str = field(default_factory=now_iso)
    hostname: Optional[str] = None
    platform: Optional[str] = None
    agent_version: Optional[str] = None
    types: Optional[List[str]] = None
    extra: JsonObject = field(default_factory=dict)
    v: int = VERSION

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"v": self.v, "agent_id": self.agent_id, "online": self.online, "ts": self.ts}
        if self.online:
            out.update(hostname=self.hostname, platform=self.platform,
                       agent_version=self.agent_version, types=self.types)
        out.update(self.extra)
        return out

    def payload(self) -> bytes:
        return dumps(self.to_dict())


def parse_status(payload: bytes, topic: ParsedTopic) -> Status:
    obj = decode_object(payload)
    online = obj.get("online")
    if not isinstance(online, bool):
        raise ContractError("bad_online", "online must be true or false")
    types = obj.get("types")
    if types is not None:
        if not isinstance(types, list):
            raise ContractError("bad_types", "types must be a list of type names")
        types = [check_type(t) for t in types]
    strings = {}
    for key in ("hostname", "platform", "agent_version"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ContractError(f"bad_{key}", f"{key} must be a string")
        strings[key] = value
    known = {"v", "agent_id", "online", "ts", "types", *strings}
    return Status(
        v=_version(obj), agent_id=_same(obj, "agent_id", check_agent_id(topic.agent_id)), online=online,
        ts=_opt_ts(obj, "ts") or now_iso(), types=types, extra={k: v for k, v in obj.items() if k not in known},
        **strings,
    )
