"""The wire contract module: topics, ids, timestamps, payload validation and config loading."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from typing import Any

import pytest

from fleet_common import (
    ContractError,
    ParsedTopic,
    Request,
    Response,
    Status,
    Topics,
    iso,
    messages,
    new_id,
    parse_iso,
    parse_request,
    parse_response,
    parse_status,
    sanitise_agent_id,
)
from fleet_common.config import ConfigError, load_config

T = Topics("fleet")
RES = ParsedTopic("res", "web-01", "cpu")


def test_topics_build_and_parse_round_trip() -> None:
    """Every topic the builders make parses back to the same agent and type."""
    assert T.request("web-01", "cpu") == "fleet/web-01/req/cpu"
    assert T.parse(T.response("web-01", "os_info")) == ParsedTopic("res", "web-01", "os_info")
    assert T.parse(T.status("a.b_c-1")) == ParsedTopic("status", "a.b_c-1", None)
    assert T.shared(T.all_responses()) == "$share/persisters/fleet/+/res/+"


@pytest.mark.parametrize("topic", ["fleet/.hidden/res/cpu", "fleet/web-01/res/CPU", "other/web-01/res/cpu",
                                   "fleet/web-01/res/cpu/extra",
                                   "fleet/web 01/status", "fleet/" + "a" * 65 + "/status"])
def test_topics_reject_what_the_contract_forbids(topic: str) -> None:
    """Agent ids and types outside the allowed alphabet and length are refused."""
    with pytest.raises(ContractError):
        T.parse(topic)


def test_default_agent_id_is_a_sanitised_host_name() -> None:
    """Host names with odd characters become valid agent ids."""
    assert sanitise_agent_id("my host.example/1") == "my-host.example-1"
    assert sanitise_agent_id(".x") == "x"


def test_ids_are_unique_and_time_ordered() -> None:
    """new_id() sorts by creation time and never repeats."""
    first = new_id()
    time.sleep(0.002)
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(first < i for i in ids)
    assert all(len(i) == 32 for i in ids)


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    """iso() gives the contract's format and parse_iso() reads it (and offsets) back."""
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(1795671360.1234) == "2026-11-26T05:36:00.123Z"
    assert parse_iso("2026-11-26T05:36:00.123Z") == pytest.approx(1795671360.123)
    assert parse_iso("2026-11-26T06:36:00+01:00") == pytest.approx(1795671360.0)
    with pytest.raises(ContractError):
        parse_iso("yesterday")


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00.000Z", "0999-05-01T12:00:00.000Z", "9999-12-31T23:59:59.999Z"])
def test_years_0001_to_9999_are_written_with_four_digits_and_read_back(text: str) -> None:
    """Both ends of what RFC 3339 can hold survive a round trip (strftime wrote year 1 as '1')."""
    assert iso(parse_iso(text)) == text


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59.999-01:00", "0001-01-01T00:30:00+01:00",
                                  "0000-06-01T00:00:00.000Z", "2026-02-30T00:00:00.000Z"])
def test_a_time_no_store_could_write_back_is_refused(text: str) -> None:
    """A time that lies outside the years 0001-9999 once in UTC is bad_timestamp when parsed, not a
    ValueError when the store formats it (which stopped every write of its batch)."""
    with pytest.raises(ContractError) as info:
        parse_iso(text)
    assert info.value.reason == "bad_timestamp"


WHEN = 1_795_671_360.0  # the receiver's clock in the window tests


@pytest.mark.parametrize(("field", "offset_s", "ok"), [
    ("collected_at", 0.0, True), ("collected_at", 86_399.0, True), ("collected_at", 86_401.0, False),
    ("collected_at", -30 * 86_400 + 1.0, True), ("collected_at", -30 * 86_400 - 1.0, False),
])
def test_response_times_must_lie_within_a_day_ahead_and_30_days_behind(field: str, offset_s: float,
                                                                        ok: bool) -> None:
    """With the receiver's clock given, collected_at outside the window is bad_timestamp; without a
    clock (the agent's own parsing) only the format is checked."""
    payload = json.dumps({"id": "x", "status": "ok", "data": {}, field: iso(WHEN + offset_s)}).encode()
    parse_response(payload, RES)
    verdict = None
    try:
        parse_response(payload, RES, now_s=WHEN)
    except ContractError as exc:
        verdict = exc.reason
    assert verdict == (None if ok else "bad_timestamp")


def test_a_request_may_expire_up_to_a_year_ahead_and_a_status_be_of_any_age() -> None:
    """expires_at has a year of room (the longest schedule interval); a Last Will's ts any age."""
    topic = ParsedTopic("req", "web-01", "cpu")
    year = 366 * 86_400
    parse_request(json.dumps({"id": "x", "expires_at": iso(WHEN + year - 1)}).encode(), topic, now_s=WHEN)
    with pytest.raises(ContractError):
        parse_request(json.dumps({"id": "x", "expires_at": iso(WHEN + year + 1)}).encode(), topic, now_s=WHEN)
    with pytest.raises(ContractError):
        parse_request(json.dumps({"id": "x", "issued_at": iso(WHEN + 2 * 86_400)}).encode(), topic, now_s=WHEN)
    will = Status(agent_id="web-01", online=False, ts="1999-01-01T00:00:00.000Z").payload()
    assert parse_status(will, ParsedTopic("status", "web-01", None), now_s=WHEN).ts == "1999-01-01T00:00:00.000Z"


def test_timestamps_come_out_in_the_canonical_form() -> None:
    """An offset or fewer digits in the payload become UTC with milliseconds in the parsed message."""
    payload = b'{"id": "x", "issued_at": "2026-11-26T06:36:00+01:00", "expires_at": "2026-11-26T05:37:00.5Z"}'
    req = parse_request(payload, ParsedTopic("req", "web-01", "cpu"))
    assert (req.issued_at, req.expires_at) == ("2026-11-26T05:36:00.000Z", "2026-11-26T05:37:00.500Z")


def test_request_defaults_and_payload() -> None:
    """Only id is required; v, params and type default as the design says."""
    req = parse_request(b'{"id": "abc"}', ParsedTopic("req", "web-01", "cpu"))
    assert (req.v, req.type, req.params) == (1, "cpu", {})
    again = parse_request(req.payload(), ParsedTopic("req", "web-01", "cpu"))
    assert again == req


def test_a_request_carries_its_job_and_refuses_one_that_is_not_an_id() -> None:
    """`job` round-trips, absent and null are no job, and anything but an id is refused (bad_job),
    which makes the request a dead letter at the persister."""
    topic = ParsedTopic("req", "web-01", "cpu")
    req = parse_request(Request(id="a", type="cpu", job="job-1_x").payload(), topic)
    assert req.job == "job-1_x"
    assert parse_request(b'{"id": "a", "job": null}', topic).job is None
    assert "job" not in Request(id="a", type="cpu").to_dict()
    for bad in ('""', '"a b"', '"x/y"', '"' + "j" * 65 + '"', "5", "true", '["j"]', '{"id": "j"}'):
        with pytest.raises(ContractError) as caught:
            parse_request(b'{"id": "a", "job": ' + bad.encode() + b"}", topic)
        assert caught.value.reason == "bad_job", bad


def test_response_round_trip() -> None:
    """An ok response survives encoding and parsing unchanged."""
    res = Response.ok("id1", "web-01", "cpu", {"percent": 1.5}, 2.0)
    assert parse_response(res.payload(), RES) == res


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty_payload"),
    (b"\xff\xfe", "not_utf8"),
    (b"{not json", "bad_json"),
    (b"[1,2]", "not_object"),
    (b'{"id":"x","agent_id":"web-02","type":"cpu","status":"ok","data":{}}', "agent_id_mismatch"),
    (b'{"id":"x","agent_id":"web-01","type":"disk","status":"ok","data":{}}', "type_mismatch"),
    (b'{"id":"x","status":"ok","data":{"$where":1}}', "bad_key"),
    (b'{"id":"x","status":"ok","data":{"a.b":1}}', "bad_key"),
    (b'{"id":"x","status":"maybe"}', "bad_status"),
    (b'{"id":"x","status":"ok","data":null}', "bad_data"),
    (b'{"id":"x","status":"error","error":{"code":"oops"}}', "bad_error"),
    (b'{"id":"bad id!","status":"ok","data":{}}', "bad_id"),
    (b'{"v":2,"id":"x","status":"ok","data":{}}', "bad_version"),
    (b'{"id":"x","status":"ok","data":{"load":NaN}}', "bad_number"),
    (b'{"id":"x","status":"ok","data":{"load":[1,-Infinity]}}', "bad_number"),
    (b'{"id":"x","status":"ok","data":' + b'[' * 40 + b']' * 40 + b'}', "too_deep"),
    (b'{"id":"x","status":"ok","data":' + b'[' * 100000 + b']' * 100000 + b'}', "too_deep"),
    (b'{"id":"x","status":"ok","data":' + b'[' * 1000 + b']' * 1000 + b'}', "too_deep"),
    # valid JSON that no store can hold: an infinite number, a string that is not UTF-8 text
    (b'{"id":"x","status":"ok","data":{"load":1e400}}', "bad_number"),
    (b'{"id":"x","status":"ok","data":{"load":-1e400}}', "bad_number"),
    (b'{"id":"x","status":"ok","data":{"name":"\\ud800"}}', "not_utf8"),
    (b'{"id":"x","status":"ok","data":{"rows":[{"ok":1},{"a.b":1}]}}', "bad_key"),
    (b'{"id":"x","status":"ok","data":{"rows":[{"ok":[{"$x":1}]}]}}', "bad_key"),
    (b'{"id":"x","status":"ok","data":{"k\\u0000":1}}', "bad_key"),
    (b'{"id":"x","status":"ok","data":{"load":1}} trailing', "bad_json"),
    (b'{"id":"x","id":"y","status":"ok","data":{}}', "duplicate_key"),
    (b'{"id":"x","status":"ok","data":{"rows":[{"a":1,"a":2}]}}', "duplicate_key"),
    (b'{"id":"x","status":"ok","data":{"a":"1:2","\\u0061":"3"}}', "duplicate_key"),
    (b'{"id":"x","status":"ok","data":{"a":"\\u003a"},"data":{"b":1}}', "duplicate_key"),
    (b'{"id":"x","status":"ok","data":{},"error":{"code":"timeout"}}', "bad_error"),
    (b'{"id":"x","status":"error","data":{},"error":{"code":"timeout"}}', "bad_data"),
    (b'{"id":"x","status":"ok","data":{},"duration_ms":-1}', "bad_duration_ms"),
    (b'{"id":"x","status":"ok","data":{},"duration_ms":1e12}', "bad_duration_ms"),
    (b'\xef\xbb\xbf{"id":"x","status":"ok","data":{}}', "bad_json"),
])
@pytest.mark.parametrize("parser", ["installed", "stdlib"])
def test_bad_responses_are_refused_with_a_precise_reason(payload: bytes, reason: str, parser: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of bad response payload gets its own stable reason code, the same from orjson (the
    persister's parser) and from the standard library's (the agent's when orjson is absent)."""
    if parser == "stdlib":
        monkeypatch.setattr(messages, "_loads", messages._loads_stdlib)
    with pytest.raises(ContractError) as info:
        parse_response(payload, RES)
    assert info.value.reason == reason


def test_colons_and_escapes_in_strings_are_no_repeated_keys() -> None:
    """The repeated-key check counts colons: ones inside strings, escaped ones and unicode escapes
    elsewhere must not be taken for a dropped key."""
    for payload in (b'{"id":"x","status":"ok","data":{"t":"04:30:00","u":"\\u003a:","k\\u00e9":1}}',
                    b'{"id":"x","status":"ok","data":{"q":"a\\":b","n":[{"a":"::"}]}}',
                    b'{ "id" : "x" , "status" : "ok" , "data" : { "a" : 1 } }'):
        assert parse_response(payload, RES).status == "ok", payload


def test_the_persister_parses_with_orjson() -> None:
    assert messages.JSON_PARSER == "orjson"


@pytest.mark.parametrize("parser", ["installed", "stdlib"])
def test_both_parsers_read_the_same_document(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers past 64 bits become floats in both (MongoDB cannot hold them as integers), escapes
    and non-ASCII text decode alike, and a nested table is checked cell by cell."""
    if parser == "stdlib":
        monkeypatch.setattr(messages, "_loads", messages._loads_stdlib)
    payload = ('{"id":"x","status":"ok","data":{"big":18446744073709551616,"max":18446744073709551615,'
               '"min":-9223372036854775808,"low":-9223372036854775809,"text":"caf\\u00e9 \u00e9 \\ud83d\\ude00",'
               '"rows":[{"a":1,"b":[{"c":null}]},{"a":2.5,"b":[]}]}}').encode()
    data = parse_response(payload, RES).data
    assert data == {"big": 1.8446744073709552e19, "max": 18446744073709551615, "min": -9223372036854775808,
                    "low": -9.223372036854776e18, "text": "caf\u00e9 \u00e9 \U0001f600",
                    "rows": [{"a": 1, "b": [{"c": None}]}, {"a": 2.5, "b": []}]}
    assert type(data["big"]) is float and type(data["max"]) is int


def _random_document(rng: random.Random, depth: int = 0, bad_keys: bool = True) -> Any:
    """JSON with tables of objects, strings holding brackets, bad keys and deep nesting, at random."""
    keys = ["pid", "name", "rss", "{k}", "[k]"] + (["a.b", "$x"] if bad_keys else ["ab", "x"])
    roll = rng.random()
    if depth > 36 or roll < 0.3:
        return rng.choice([1, 2.5, None, True, "x", "{", "[]", "}]", "a{b[c"])
    if roll < 0.55:  # a table
        return [{rng.choice(keys[:3] if rng.random() < 0.9 else keys): _random_document(rng, depth + 2, bad_keys)
                 if rng.random() < 0.1 else _deep(rng, depth + 2) if rng.random() < 0.03
                 else rng.choice([1, "s", None, "{"]) for _ in range(rng.randint(1, 4))}
                for _ in range(rng.randint(1, 6))]
    if roll < 0.75:
        return [_random_document(rng, depth + 1, bad_keys) for _ in range(rng.randint(0, 3))]
    return {rng.choice(keys[:3] if rng.random() < 0.95 else keys) + str(i): _random_document(rng, depth + 1, bad_keys)
            for i in range(rng.randint(0, 3))}


def _deep(rng: random.Random, depth: int) -> Any:
    """A chain of arrays, objects or both ending near MAX_DEPTH (32), on either side of it."""
    value: Any = 1
    share_of_arrays = rng.choice([0.0, 0.5, 1.0])
    for _ in range(max(0, 34 - depth - rng.randint(0, 3))):
        value = [value] if rng.random() < share_of_arrays else {"n": value}
    return value


def _verdict(fn: Any) -> str:
    try:
        fn()
    except ContractError as exc:
        return exc.reason
    return "ok"


def test_a_parsed_payload_is_checked_as_thoroughly_as_a_built_one() -> None:
    """decode_object skips a table's cells when the text cannot hold another object or array; its
    verdict is the full walk's (check_document) on thousands of random documents, among them
    brackets in strings, bad keys and too-deep nesting inside table cells; and a document that
    repeats a key is refused for it (or for what the walk finds first). (A document with both a
    bad key and too deep a nesting may be refused for either.)"""
    rng = random.Random(5)
    verdicts: Counter[str] = Counter()
    for i in range(4000):
        bad_keys = i % 2 == 0
        doc = {"rows": _random_document(rng, 0, bad_keys), "more": _random_document(rng, 0, bad_keys)}
        text = json.dumps(doc)
        repeated = i % 10 == 1
        if repeated:  # a duplicate key: the text holds an object the parsed document does not
            text = text[:-1] + ', "rows": {"dup": 1}}'
        payload = text.encode()
        full = _verdict(lambda p=payload: messages.check_document(messages._loads(p)))
        if repeated and full == "ok":
            full = "duplicate_key"
        fast = _verdict(lambda p=payload: messages.decode_object(p))
        assert fast == full or (bad_keys and "ok" not in (fast, full)), text
        verdicts[full] += 1
    assert verdicts["ok"] > 300 and verdicts["bad_key"] > 300 and verdicts["too_deep"] > 30, verdicts


def test_check_document_still_finds_nan_in_what_an_agent_built() -> None:
    """The agent checks what its collectors return before sending it."""
    with pytest.raises(ContractError) as info:
        messages.check_document({"rows": [{"a": 1.0}, {"a": float("nan")}]})
    assert info.value.reason == "bad_number"
    with pytest.raises(ContractError) as info:
        messages.check_document({"x": [[[1]]]}, depth=messages.MAX_DEPTH - 1)
    assert info.value.reason == "too_deep"
    messages.check_document({"rows": [{"a": 1.0, "b": [1, 2]}], "n": None})


def test_status_birth_and_will() -> None:
    """A birth carries types; a will carries only online=false; extra keys survive."""
    birth = Status("web-01", True, hostname="web-01", platform="Linux", agent_version="0.1.0", types=["cpu"],
                   extra={"counters": {"answered": 3}})
    parsed = parse_status(birth.payload(), ParsedTopic("status", "web-01", None))
    assert parsed.types == ["cpu"] and parsed.online and parsed.extra == {"counters": {"answered": 3}}
    will = json.loads(Status("web-01", False).payload())
    assert set(will) == {"v", "agent_id", "online", "ts"}


def test_expired_request() -> None:
    """A request is expired once its expires_at has passed."""
    req = Request(id="x", type="cpu", expires_at=iso(time.time() - 1))
    assert req.is_expired(time.time())


def test_config_defaults_without_a_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    """With no config.yaml the built-in defaults apply, as the design lists them."""
    cfg = load_config(None, env={})
    assert cfg.mqtt.port == 1883 and cfg.controller.schedule["os_info"] == 3600
    assert cfg.persister.retention_s == {"default": 604800, "processes": 86400}
    assert cfg.persister.trend_retention_s == 34560000


def test_config_env_overrides_scalars(tmp_path) -> None:
    """FLEET_<SECTION>_<KEY> overrides a file value, with the type of the key."""
    path = tmp_path / "c.yaml"
    path.write_text("mqtt:\n  port: 1999\n  host: broker\n")
    cfg = load_config(str(path), env={"FLEET_MQTT_PORT": "1884", "FLEET_MQTT_PASSWORD": "123",
                                      "FLEET_MQTT_TLS_ENABLED": "true", "FLEET_TEST_MONGODB_URI": "x"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.password, cfg.mqtt.tls.enabled) == ("broker", 1884, "123", True)


@pytest.mark.parametrize(("text", "env", "key"), [
    ("mqtt:\n  hots: x\n", {}, "mqtt.hots"),
    ("mqtt:\n  port: many\n", {}, "mqtt.port"),
    ("mqttt: {}\n", {}, "mqttt"),
    ("controller:\n  schedule: {cpu: 0}\n", {}, "controller.schedule.cpu"),
    ("controller:\n  schedule: {cpu: 40000000}\n", {}, "controller.schedule.cpu"),
    ("controller:\n  shard: 2/2\n", {}, "controller.shard"),
    ("persister:\n  store: postgres\n", {}, "persister.store"),
    ("", {"FLEET_AGENT_IDD": "x"}, "agent.idd"),
    ("", {"FLEET_MQTT_PORT": "x"}, "mqtt.port"),
])
def test_bad_config_names_the_key(tmp_path, text: str, env: dict, key: str) -> None:
    """A wrong key or value stops loading with an error that names the key."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env=env)
    assert info.value.key == key


def test_missing_explicit_config_file_is_an_error(tmp_path) -> None:
    """--config pointing nowhere is reported, not silently replaced by defaults."""
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "nope.yaml"), env={})


def test_tls_files_must_exist(tmp_path) -> None:
    """With TLS on, a CA file that is not there stops start-up naming the key, not a traceback later."""
    path = tmp_path / "c.yaml"
    path.write_text(f"mqtt:\n  tls: {{enabled: true, ca_file: {tmp_path / 'missing-ca.crt'}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.key == "mqtt.tls.ca_file"


@pytest.mark.parametrize("args", [("fleet/web-01/res/cpu", b"0123456789abcdef" * 2, 60), (None, b"x", None),
                                  ("t" * 300, None, 3600), (None, None, 0), ("caf\u00e9/r", b"", 2**31)])
def test_packed_publish_properties_are_what_paho_would_write(args: tuple) -> None:
    """The controller's pre-encoded PUBLISH properties: the same bytes as paho's Properties.pack,
    and they read back to the same values."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from fleet_common.compat import PackedProperties

    packed = PackedProperties(*args)
    assert packed.pack() == packed.unpacked().pack()
    back = Properties(PacketTypes.PUBLISH)
    _, length = back.unpack(packed.pack())
    assert length == len(packed.pack()) and str(back) == str(packed)
    if args[1] is not None:
        assert packed.CorrelationData == args[1]


@pytest.mark.parametrize("request_", [
    Request(id=new_id(), type="cpu", issued_at="2026-11-26T04:30:00.123Z", expires_at="2026-11-26T04:31:00.123Z"),
    Request(id="x", type="cpu"),
    Request(id='quote"d', type="cpu", issued_at="2026-11-26T04:30:00+01:00"),
    Request(id="x", type="processes", params={"limit": 5, "sort_by": "rss"}),
    Request(id="x\\y", type="cpu", expires_at="t\u00e9"),
    Request(id="x", type="ping", job="0193e5c2a1b17c3d9f8e6a5b4c3d2e00"),
    Request(id="x", type="ping", issued_at="2026-11-26T04:30:00.123Z", job="j-1_x"),
    Request(id="x", type="ping", params={"a": 1}, job="j"),
])
def test_request_payload_is_the_same_bytes_on_the_fast_path(request_: Request) -> None:
    assert request_.payload() == messages.dumps(request_.to_dict())
    assert json.loads(request_.payload()) == request_.to_dict()
