"""How the persister checks a built-in type's data, measured: the plain-Python reference checker
(fleet_common.datatypes), msgspec (what the persister uses, fleet_persister.datacheck) and,
if it is installed, fastjsonschema on the same JSON Schemas. Microseconds per answer of the
simulator's realistic data (a processes answer lists 250 processes), median of 7 runs.

    .venv/bin/python bench/validators.py
    .venv/bin/pip install fastjsonschema   # to compare it too
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import orjson
from fleet_sim.synthetic import TYPES, Host

from fleet_common.datatypes import BUILTIN, json_schemas
from fleet_persister.datacheck import check_data


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


def row(type_: str, text: bytes, compile_schema: Any) -> str:
    data: dict[str, Any] = orjson.loads(text)
    n = 200 if type_ == "processes" else 2000
    reference = per_call_us(lambda: BUILTIN[type_].check_data(data), n)
    fast = per_call_us(lambda: check_data(type_, data, len(text)), n)
    parse = per_call_us(lambda: orjson.loads(text), n)
    other = "not installed"
    if compile_schema is not None:
        validate = compile_schema(json_schemas()[type_]["data"])
        other = f"{per_call_us(lambda: validate(data), n):.1f}"
    return f"{type_:10} {len(text):7} {parse:8.1f} {reference:8.1f} {fast:8.1f} {other:>15}"


def main() -> None:
    try:
        from fastjsonschema import compile as compile_schema
    except ImportError:
        compile_schema = None
    host = Host("bench-host")
    print(f"{'type':10} {'bytes':>7} {'parse':>8} {'python':>8} {'msgspec':>8} {'fastjsonschema':>15}")
    for type_ in TYPES:
        print(row(type_, host.reading(type_, {}), compile_schema))


if __name__ == "__main__":
    main()
