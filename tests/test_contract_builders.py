"""The contract's builders that every component shares: where an agent answers, the response
envelope around pre-serialised data, the one request builder, and `ago()`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing

import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_common import ContractError, ParsedTopic, Response, Topics, parse_request, parse_response
from fleet_common.ask import build_request
from fleet_common.messages import ok_response_payload
from fleet_common.timefmt import ago, is_valid_id, iso, parse_iso
from fleet_common.topics import MAX_TOPIC_BYTES, Kind, is_reply_topic

T = Topics("fleet")
OWN = "fleet/web-01/res/cpu"
AT = "2026-11-26T04:30:00.140Z"


@pytest.mark.parametrize("asked", [OWN, "fleet/web-01/res/mine/1", "fleet/web-01/res/x"])
def test_an_agent_answers_on_a_response_topic_under_its_own(asked: str) -> None:
    """A ResponseTopic under <prefix>/<agent>/res/ is where the answer goes (mosquitto_rr)."""
    assert T.reply("web-01", "cpu", asked) == asked


@pytest.mark.parametrize("asked", [
    None, b"fleet/web-01/res/x", 42, "", "fleet/web-01/res/", "fleet/web-02/res/cpu", "fleet/web-010/res/cpu",
    "fleet/web-01/req/cpu", "fleet/web-01/resx", "other/web-01/res/cpu", "fleet/web-01/res/+",
    "fleet/web-01/res/#", "fleet/web-01/res/a+b", "fleet/web-01/res/a\x00b",
    "fleet/web-01/res/" + "x" * (MAX_TOPIC_BYTES - len("fleet/web-01/res/") + 1),
    "fleet/web-01/res/" + "\u00e9" * (MAX_TOPIC_BYTES // 2),  # short in characters, too long in UTF-8
])
def test_any_other_response_topic_falls_back_to_the_agents_own(asked: object) -> None:
    """Other agents' topics, wildcards, NUL and topics longer than MQTT allows are not answered on."""
    assert not is_reply_topic(asked, T.response_base("web-01"))
    assert T.reply("web-01", "cpu", asked) == OWN


def test_the_longest_allowed_reply_topic_is_used() -> None:
    """Exactly MAX_TOPIC_BYTES of UTF-8 is still a topic."""
    longest = "fleet/web-01/res/" + "x" * (MAX_TOPIC_BYTES - len("fleet/web-01/res/"))
    assert T.reply("web-01", "cpu", longest) == longest


def test_the_reply_rule_checks_the_agent_id() -> None:
    """An id the contract forbids is refused, not turned into a topic."""
    with pytest.raises(ContractError):
        T.reply("a/b", "cpu", "fleet/a/b/res/cpu")


def test_parsed_topic_kinds_are_the_three_of_the_contract() -> None:
    """ParsedTopic.kind is one of req, res and status, as its Literal type says."""
    assert typing.get_args(Kind) == ("req", "res", "status")
    assert [T.parse(t).kind for t in (T.request("a", "cpu"), T.response("a", "cpu"), T.status("a"))] == \
        ["req", "res", "status"]


def _envelope(req_id: str, agent_id: str, type_: str, data: dict, ms: float) -> bytes:
    return Response(id=req_id, agent_id=agent_id, type=type_, status="ok", data=data, collected_at=AT,
                    duration_ms=round(ms, 3)).payload()


@pytest.mark.parametrize("req_id, agent_id, ms", [
    ("0193e5c2a1b27c3d9f8e6a5b4c3d2e1f", "web-01", 4.1), ("x", "a.b_c-1", 0.0), ("x", "web-01", 12.3456789),
    ("x", "web-01", 7), ('quo"te', "web-01", 1.0), ("back\\slash", "web-01", 1.0), ("tab\t", "web-01", 1.0),
    ("\u00e9t\u00e9", "web-01", 1.0), ("x", "web-01", 1e300),
])
def test_the_fast_envelope_is_the_same_bytes_as_a_response(req_id: str, agent_id: str, ms: float) -> None:
    """ok_response_payload around pre-serialised data writes what Response.payload() writes."""
    data = {"percent": 12.5, "per_cpu": [10.0, 15.0], "name": "caf\u00e9"}
    data_json = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    assert ok_response_payload(req_id, agent_id, "cpu", data_json, ms, AT) == _envelope(req_id, agent_id, "cpu",
                                                                                         data, ms)


@settings(max_examples=examples(200), deadline=None)
@given(req_id=st.text(max_size=70), ms=st.floats(min_value=0, max_value=86400000.0))
def test_any_envelope_the_fast_path_writes_parses_back(req_id: str, ms: float) -> None:
    """Whatever the strings hold, the bytes are the response's, and a valid one parses back to it."""
    try:
        expected = _envelope(req_id, "web-01", "cpu", {"a": 1}, ms)
    except UnicodeEncodeError:  # a lone surrogate is no UTF-8 text either way
        with pytest.raises(UnicodeEncodeError):
            ok_response_payload(req_id, "web-01", "cpu", b'{"a":1}', ms, AT)
        return
    got = ok_response_payload(req_id, "web-01", "cpu", b'{"a":1}', ms, AT)
    assert got == expected
    if is_valid_id(req_id):
        res = parse_response(got, ParsedTopic("res", "web-01", "cpu"))
        assert (res.id, res.data, res.duration_ms) == (req_id, {"a": 1}, round(ms, 3))


def test_the_fast_envelope_refuses_what_json_cannot_hold() -> None:
    """Data that is not a serialised object, and a NaN duration, are errors, not bad bytes on the wire."""
    with pytest.raises(ValueError):
        ok_response_payload("x", "web-01", "cpu", b"[1]", 1.0)
    with pytest.raises(ValueError):
        ok_response_payload("x", "web-01", "cpu", b"{}", float("nan"))


def test_the_envelope_is_collected_now_unless_told() -> None:
    """collected_at defaults to the sender's clock, in the contract's format."""
    before = parse_iso(iso(time.time()))
    res = parse_response(ok_response_payload("x", "web-01", "cpu", b"{}", 1.0), ParsedTopic("res", "web-01", "cpu"))
    assert parse_iso(res.collected_at) >= before


def test_request_and_response_topics_together_are_the_same_as_apart() -> None:
    """The controller's one-check builder makes the same two topics, and refuses what they refuse."""
    assert T.request_and_response("web-01", "cpu") == (T.request("web-01", "cpu"), T.response("web-01", "cpu"))
    for agent, type_ in (("web 01", "cpu"), ("web-01", "CPU"), (".x", "cpu")):
        with pytest.raises(ContractError):
            T.request_and_response(agent, type_)


def test_a_built_request_is_what_the_agent_and_mosquitto_rr_expect() -> None:
    """The one request builder: its topic, a payload that parses, and the MQTT 5 properties."""
    out = build_request(T, "web-01", "processes", 60, {"limit": 5}, now_s=1795671360.0)
    assert out.topic == "fleet/web-01/req/processes" and out.reply_topic == "fleet/web-01/res/processes"
    req = parse_request(out.payload(), T.parse(out.topic))
    assert req == out.request and req.params == {"limit": 5}
    assert (req.issued_at, req.expires_at) == ("2026-11-26T05:36:00.000Z", "2026-11-26T05:37:00.000Z")
    assert out.properties is not None
    props = out.properties.unpacked()
    assert (props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval) == \
        (out.reply_topic, req.id.encode(), 60)


def test_a_short_request_still_waits_a_second_at_the_broker() -> None:
    """MQTT's expiry is whole seconds: under one second would be none at all."""
    out = build_request(T, "web-01", "ping", 0.5)
    assert out.properties is not None
    assert out.properties.unpacked().MessageExpiryInterval == 1
    assert out.request.params == {} and parse_iso(out.request.expires_at or "") > parse_iso(out.request.issued_at or "")


def test_built_requests_have_distinct_ids() -> None:
    assert len({build_request(T, "web-01", "cpu", 60).request.id for _ in range(100)}) == 100


def test_the_dashboard_does_not_load_fleetctl() -> None:
    """The web app asks agents through fleet_common: importing it loads no fleetctl module."""
    code = "import sys, fleet_dashboard.app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'fleetctl'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("age_s, text", [(0, "0s ago"), (59, "59s ago"), (60, "1m ago"), (3600 * 5, "5h ago"),
                                         (86400 * 3, "3d ago"), (-30, "0s ago")])
def test_ago_says_how_long_ago_for_people(age_s: float, text: str) -> None:
    """One ago() for fleetctl and the dashboard: the largest whole unit, a time ahead as 0s."""
    now = 1795671360.0
    assert ago(iso(now - age_s), now) == text


def test_ago_of_nothing_is_never() -> None:
    assert ago(None) == ago("") == "never"
