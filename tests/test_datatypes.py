"""The per-type contract (fleet_common.datatypes): one definition of each built-in type's params
and data, which the agent, the simulator, the persister's fast check (msgspec) and the AsyncAPI
document all follow. Generated data (Hypothesis) holds the two checkers together."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import examples
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import ANY_JSON, conforming

from fleet_common import ContractError
from fleet_common.datatypes import BUILTIN, EXAMPLES
from fleet_common.datatypes import example as example_data
from fleet_persister.datacheck import check_data

TYPES = sorted(BUILTIN)


def verdict(fn: Any) -> str | None:
    try:
        fn()
    except ContractError as exc:
        return exc.reason
    return None


def mutate(draw: Any, value: Any) -> Any:
    """`value` with one node somewhere in it replaced by arbitrary JSON, or removed."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate(draw, value[key])}
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], mutate(draw, value[i]), *value[i + 1:]]
    return draw(ANY_JSON)


@pytest.mark.parametrize("type_", TYPES)
def test_each_example_is_its_types_data(type_: str) -> None:
    """The examples (the AsyncAPI document's and the tests') pass both checkers."""
    BUILTIN[type_].check_data(EXAMPLES[type_])
    check_data(type_, EXAMPLES[type_], 100)


@pytest.mark.parametrize("type_", TYPES)
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_conforming_data_passes_both_checkers(type_: str, data: st.DataObject) -> None:
    """Whatever the definition allows (optional fields left out or null, extra keys) both checkers accept."""
    value = data.draw(conforming(BUILTIN[type_].data))
    BUILTIN[type_].check_data(value)
    check_data(type_, value, len(json.dumps(value)))


@pytest.mark.parametrize("type_", TYPES)
@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_check_and_the_reference_agree_on_anything(type_: str, data: st.DataObject) -> None:
    """On data with any node changed to any JSON, msgspec's verdict is the reference checker's, and a
    refusal names the field (`data.<path> ...`)."""
    value = mutate(data.draw, data.draw(conforming(BUILTIN[type_].data)))
    if not isinstance(value, dict):
        return  # the envelope refuses data that is not an object
    ref = verdict(lambda: BUILTIN[type_].check_data(value))
    fast: ContractError | None = None
    try:
        check_data(type_, value, 100)
    except ContractError as exc:
        fast = exc
    assert (ref is None) == (fast is None), (value, ref, fast)
    if fast is not None:
        assert fast.reason == "bad_data" and fast.detail.startswith("data"), fast


@pytest.mark.parametrize(("type_", "data", "says"), [
    ("cpu", example_data("cpu", percent="hello"), "data.percent is a string, not a number"),
    ("cpu", example_data("cpu", percent=250.0), "data.percent is 250.0, above 100"),
    ("cpu", {"blob": "x" * 100}, "data has no 'percent'"),
    ("disk", example_data("disk", partitions=["x"]), "data.partitions[0] is a string, not an object"),
    ("processes", {"processes": {"nginx": {"pid": 1}}}, "data.processes is an object, not an array"),
    ("processes", example_data("processes", processes=[{"pid": "1"}]), "data.processes[0].pid is a string"),
    ("network", example_data("network", interfaces=[{"name": "eth0", "bytes_sent": -1}]),
     "data.interfaces[0].bytes_sent is -1, below 0"),
    ("memory", example_data("memory", virtual={"total": 1.5}), "data.virtual.total is a number, not an integer"),
    ("os_info", example_data("os_info", boot_time=1790000000), "data.boot_time is an integer"),
])
def test_non_conforming_data_is_refused_naming_the_field(type_: str, data: dict[str, Any], says: str) -> None:
    """The shapes the issue found stored as ok (a string percent, a table of strings, a map keyed by
    process name) are refused as bad_data, with the path of the first field that is wrong."""
    with pytest.raises(ContractError) as info:
        check_data(type_, data, len(json.dumps(data)))
    assert info.value.reason == "bad_data" and says in info.value.detail, info.value.detail


def test_an_answer_far_larger_than_its_type_is_refused() -> None:
    """A cpu answer carrying 3 MB (valid fields and a blob) is not a cpu answer."""
    data = example_data("cpu", blob="x" * 3_000_000)
    with pytest.raises(ContractError) as info:
        check_data("cpu", data, 3_000_100)
    assert info.value.reason == "bad_data" and "larger than" in info.value.detail


def test_types_beyond_the_built_ins_keep_the_envelope_checks_only() -> None:
    """A collector registered by name (no schema here) may answer with any object."""
    check_data("gpu_temp", {"anything": [1, {"goes": True}]}, 100)


@given(params=st.dictionaries(st.sampled_from(["limit", "sort_by", "top"]), ANY_JSON, max_size=3))
@example(params={"sort_by": ["rss"]})
def test_params_are_checked_with_defaults_or_refused_naming_the_param(params: dict[str, Any]) -> None:
    """processes params: limit 1..10000 (default 50), sort_by one of five (default cpu_percent);
    anything else, a list for sort_by included, is bad_params naming it, never another error."""
    processes = BUILTIN["processes"]
    try:
        checked = processes.check_params(params)
    except ContractError as exc:
        assert exc.reason == "bad_params" and ("params." in exc.detail or "unknown param" in exc.detail), exc
        return
    assert set(params) <= {"limit", "sort_by"}
    assert 1 <= checked["limit"] <= 10000 and type(checked["limit"]) is int
    assert checked["sort_by"] in ("cpu_percent", "rss", "create_time", "pid", "name")
    assert checked == {"limit": 50, "sort_by": "cpu_percent", **params}
