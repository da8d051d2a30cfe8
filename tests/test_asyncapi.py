"""docs/asyncapi.yaml describes the wire contract that fleet_common implements; these tests
hold the two together (topics, patterns, types, error codes, required fields, examples)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import yaml
from conftest import ROOT

from fleet_common import BUILTIN_TYPES, ContractError, Request, Response, Status, Topics, messages
from fleet_common.config import load_config
from fleet_common.datatypes import BUILTIN, json_schemas
from fleet_common.messages import ERROR_CODES, STATUSES, VERSION, parse_request, parse_response, parse_status
from fleet_common.timefmt import _ID_RE
from fleet_common.topics import AGENT_ID_RE, TYPE_RE, ParsedTopic
from fleet_persister.datacheck import check_data

DOC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
TOPICS = Topics("fleet")
PARSERS: dict[str, Callable[[bytes, ParsedTopic], Any]] = {
    "Request": parse_request, "Response": parse_response, "Status": parse_status}
WHERE = {"Request": TOPICS.parse(TOPICS.request("web-01", "cpu")),
         "Response": TOPICS.parse(TOPICS.response("web-01", "cpu")),
         "Status": TOPICS.parse(TOPICS.status("web-01"))}


def resolve(ref: str) -> Any:
    node: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def parses(schema: str, obj: dict[str, Any]) -> bool:
    try:
        PARSERS[schema](json.dumps(obj).encode(), WHERE[schema])
    except ContractError:
        return False
    return True


def test_document_is_asyncapi_3_and_every_ref_resolves() -> None:
    """The file declares AsyncAPI 3.1.0 and has no dangling $ref."""
    assert DOC["asyncapi"] == "3.1.0"
    for ref in refs(DOC):
        assert ref.startswith("#/") and resolve(ref) is not None, ref


def test_channel_addresses_are_the_topics_fleet_common_builds() -> None:
    """Each channel address, filled in, is the topic fleet_common.Topics builds, and parses back as its kind."""
    channels = DOC["channels"]
    built = {"request": TOPICS.request("web-01", "cpu"), "response": TOPICS.response("web-01", "cpu"),
             "status": TOPICS.status("web-01")}
    kinds = {"request": "req", "response": "res", "status": "status"}
    assert set(channels) == set(built)
    for name, channel in channels.items():
        topic = channel["address"].format(agent_id="web-01", type="cpu")
        assert topic == built[name]
        assert TOPICS.parse(topic).kind == kinds[name]
        assert set(channel["parameters"]) == ({"agent_id", "type"} if "{type}" in channel["address"] else {"agent_id"})


def test_patterns_are_the_contract_patterns() -> None:
    """Agent id, type and request id patterns in the document are the regular expressions the contract uses."""
    params = DOC["components"]["parameters"]
    assert params["agent_id"]["x-pattern"] == AGENT_ID_RE.pattern
    assert params["type"]["x-pattern"] == TYPE_RE.pattern
    assert SCHEMAS["Request"]["properties"]["type"]["pattern"] == TYPE_RE.pattern
    assert SCHEMAS["Status"]["properties"]["types"]["items"]["pattern"] == TYPE_RE.pattern
    assert SCHEMAS["Id"]["pattern"] == _ID_RE.pattern
    assert set(params["type"]["examples"]) == set(BUILTIN_TYPES)


def test_enums_and_version_match_the_contract() -> None:
    """Error codes, response statuses and the payload version are the contract's."""
    assert SCHEMAS["Error"]["properties"]["code"]["enum"] == list(ERROR_CODES)
    assert SCHEMAS["Response"]["properties"]["status"]["enum"] == list(STATUSES)
    assert SCHEMAS["Version"]["const"] == VERSION


AGENT_STATUS_EXTRAS = {"outbox", "counters"}


@pytest.mark.parametrize("schema,fields", [
    ("Request", set(Request(id="x", type="cpu", job="j").to_dict())),
    ("Response", set(Response.ok("x", "web-01", "cpu", {}, 1.0).to_dict())),
    ("Status", set(Status(agent_id="web-01", online=True, labels={"role": "web"}).to_dict())),
])
def test_properties_are_the_fields_the_contract_writes(schema: str, fields: set) -> None:
    """Every field fleet_common writes into a payload is described, and nothing else is
    (the agent's own additions to its status are checked below)."""
    described = set(SCHEMAS[schema]["properties"]) - (AGENT_STATUS_EXTRAS if schema == "Status" else set())
    assert described == fields


def test_status_describes_what_the_agent_adds(tmp_path) -> None:
    """The fields fleet-agent adds to its birth message (outbox, counters) are the ones described."""
    from fleet_agent.agent import Agent
    cfg = load_config(None, env={"FLEET_AGENT_OUTBOX_PATH": str(tmp_path / "outbox.db")})
    agent = Agent(cfg, agent_id="web-01")
    try:
        birth = agent.presence.birth().to_dict()
    finally:
        agent.outbox.close()
    assert set(birth) - set(Status(agent_id="web-01", online=True).to_dict()) == AGENT_STATUS_EXTRAS


@pytest.mark.parametrize("schema", ["Request", "Response", "Status"])
def test_examples_are_accepted_by_the_contract(schema: str) -> None:
    """Every example payload in the document passes fleet_common's validation."""
    examples: list[dict[str, Any]] = SCHEMAS[schema]["examples"]
    assert examples
    for example in examples:
        assert parses(schema, example), example


@pytest.mark.parametrize("schema", ["Request", "Response", "Status"])
def test_required_fields_are_exactly_what_the_contract_requires(schema: str) -> None:
    """Dropping a field the document marks required is rejected; dropping all the others is accepted."""
    example = SCHEMAS[schema]["examples"][0]
    required = set(SCHEMAS[schema]["required"])
    for field in required:
        assert not parses(schema, {k: v for k, v in example.items() if k != field}), f"{schema} without {field}"
    conditional = {f for branch in SCHEMAS[schema].get("oneOf", []) for f in branch.get("required", [])}
    minimal = {k: v for k, v in example.items() if k in required | conditional}
    assert parses(schema, minimal), minimal


def test_response_branches_need_data_when_ok_and_error_when_error() -> None:
    """The document's oneOf (ok needs data, error needs error) is how the contract validates a response."""
    branches = {b["properties"]["status"]["const"]: b["required"] for b in SCHEMAS["Response"]["oneOf"]}
    assert branches == {"ok": ["data"], "error": ["error"]}
    ok = {"id": "r1", "status": "ok", "data": {}}
    error = {"id": "r1", "status": "error", "error": {"code": "timeout"}}
    assert parses("Response", ok) and parses("Response", error)
    assert not parses("Response", {k: v for k, v in ok.items() if k != "data"})
    assert not parses("Response", {k: v for k, v in error.items() if k != "error"})
    bad = copy.deepcopy(error)
    bad["error"]["code"] = "not_a_code"
    assert not parses("Response", bad)
    assert SCHEMAS["Error"]["required"] == ["code"]


def test_operations_use_qos_1_and_retain_only_status() -> None:
    """Requests are QoS 1 and not retained; status is QoS 1 and retained; the reply goes to the response channel."""
    ops = DOC["operations"]
    request = dict(ops["answerRequest"]["bindings"]["mqtt"])
    request.pop("messageExpiryInterval")
    assert request == {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}
    assert ops["publishStatus"]["bindings"]["mqtt"]["retain"] is True
    assert ops["answerRequest"]["reply"]["channel"]["$ref"] == "#/channels/response"


def test_requests_carry_their_expiry_and_correlation_where_mqtt_bindings_put_them() -> None:
    """MessageExpiryInterval is a per-request integer on the operation's MQTT binding (bindings 0.2.0
    have it nowhere else); CorrelationData and ResponseTopic stay on the request message's binding."""
    expiry = DOC["operations"]["answerRequest"]["bindings"]["mqtt"]["messageExpiryInterval"]
    assert (expiry["type"], expiry["minimum"], expiry["maximum"]) == ("integer", 0, 2**32 - 1)
    message = DOC["components"]["messages"]["request"]["bindings"]["mqtt"]
    assert set(message) == {"correlationData", "responseTopic", "bindingVersion"}


def test_each_built_in_type_carries_the_schemas_fleet_common_defines() -> None:
    """docs/asyncapi.yaml holds every built-in type's params and data schema exactly as
    fleet_common.datatypes makes them, with its size limit, and nothing for types it lacks."""
    by_type = SCHEMAS["BuiltInTypes"]["x-types"]
    assert set(by_type) == set(BUILTIN) == set(BUILTIN_TYPES)
    for type_, parts in json_schemas().items():
        for part in ("params", "data"):
            described = dict(resolve(by_type[type_][part]["$ref"]))
            described.pop("description")
            described.pop("examples", None)
            assert described == parts[part], (type_, part)
        assert by_type[type_]["maxPayloadBytes"] == BUILTIN[type_].max_payload_bytes
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "asyncapi_types.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_each_types_example_is_data_the_persister_stores() -> None:
    """The data examples in the document pass the persister's check of their type."""
    for type_, parts in SCHEMAS["BuiltInTypes"]["x-types"].items():
        for example in resolve(parts["data"]["$ref"])["examples"]:
            check_data(type_, example, len(json.dumps(example)))


def test_the_timestamp_window_is_the_one_receivers_apply() -> None:
    """The window the document gives for timestamps is the one parse_* apply (messages.FUTURE_S, ...)."""
    ts = SCHEMAS["Timestamp"]
    assert (ts["x-future-s"], ts["x-past-s"], ts["x-expires-future-s"]) == (
        messages.FUTURE_S, messages.PAST_S, messages.EXPIRES_FUTURE_S)
    status = SCHEMAS["Status"]["properties"]
    assert {k: status[k]["maxLength"] for k in messages.STATUS_STRINGS} == messages.STATUS_STRINGS
    assert status["types"]["maxItems"] == messages.MAX_TYPES
    assert SCHEMAS["Response"]["properties"]["duration_ms"]["maximum"] == messages.MAX_DURATION_MS
