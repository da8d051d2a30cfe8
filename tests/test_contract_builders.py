"""The contract's builders that every component shares: where an agent answers, the response
envelope around pre-serialised data, the one request builder, and `ago()`."""

from __future__ import annotations

import typing

import pytest

from fleet_common import ContractError, Topics
from fleet_common.topics import MAX_TOPIC_BYTES, Kind, is_reply_topic

T = Topics("fleet")
OWN = "fleet/web-01/res/cpu"


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
