"""The collector registry, the error a collector raises for bad params, and JSON-safety helpers."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from fleet_common.datatypes import DataType, datatype
from fleet_common.errors import ContractError
from fleet_common.topics import check_type

log = logging.getLogger("fleet.agent")

JsonObject = dict[str, Any]
Collector = Callable[[JsonObject], JsonObject]
C = TypeVar("C", bound=Collector)

REGISTRY: dict[str, Collector] = {}
"""Request type -> collector. A collector takes the request params and returns the response data."""

PRIMERS: dict[str, Callable[[], None]] = {}
"""Request type -> function the agent calls once at start (e.g. to take a first CPU sample)."""


class BadParams(ValueError):
    """The request's params are not acceptable; the agent answers with error code `bad_request`."""


def register(name: str, prime: Callable[[], None] | None = None) -> Callable[[C], C]:
    """Decorator: make `fn(params) -> data` the collector of request type `name`."""
    check_type(name)

    def decorate(fn: C) -> C:
        REGISTRY[name] = fn
        if prime is not None:
            PRIMERS[name] = prime
        else:
            PRIMERS.pop(name, None)
        return fn

    return decorate


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)
    PRIMERS.pop(name, None)


def prime_all(collectors: Mapping[str, Collector]) -> None:
    """Run the priming step of each of `collectors` that is the registered one (a collector put
    in its place has no primer here); a failing primer is not fatal (the collector primes itself)."""
    for name in sorted(collectors):
        primer = PRIMERS.get(name)
        if primer is not None and collectors[name] is REGISTRY.get(name):
            try:
                primer()
            except Exception as exc:  # priming is an optimisation only
                log.debug("priming %s failed: %s", name, exc)


def checked_params(type_: str, params: JsonObject) -> JsonObject:
    """The params of a request of built-in type `type_`, checked against the contract
    (fleet_common.datatypes) and with their defaults; BadParams naming the param otherwise."""
    try:
        return datatype_of(type_).check_params(params)
    except ContractError as exc:
        raise BadParams(exc.detail) from None


def datatype_of(type_: str) -> DataType:
    found = datatype(type_)
    if found is None:
        raise KeyError(f"{type_!r} is not a built-in type")
    return found


def jsonable(value: Any) -> Any:
    """Plain JSON values from psutil results: namedtuples become objects, NaN/inf become null."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {str(k): jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def attempt(fn: Callable[[], Any], default: Any = None) -> Any:
    """fn() made JSON-safe, or `default` when the platform does not have it or denies it."""
    try:
        return jsonable(fn())
    except Exception:  # missing features, AccessDenied, NotImplementedError, OSError...
        return default
