"""Topic builders and parsers: the only place a topic string is assembled.

    <prefix>/<agent_id>/req/<type>   requests to an agent
    <prefix>/<agent_id>/res/<type>   its responses
    <prefix>/<agent_id>/status       its retained birth / Last Will
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from .errors import ContractError

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
# The fixed share group of earlier versions. Anyone can guess it, so persisters no longer use it
# (persister.share_group is a per-deployment secret); a resumed session still leaves it.
SHARE_GROUP = "persisters"

Kind = Literal["req", "res", "status"]
REQ: Kind = "req"
RES: Kind = "res"
STATUS: Kind = "status"
# MQTT's limit on a topic name: its UTF-8 length is a two-byte field.
MAX_TOPIC_BYTES = 65535


def check_agent_id(value: object) -> str:
    if not isinstance(value, str) or not AGENT_ID_RE.match(value):
        raise ContractError(
            "bad_agent_id",
            f"{str(value)[:80]!r} is not 1-64 characters of [A-Za-z0-9_.-] not starting with '.'",
        )
    return value


def check_type(value: object) -> str:
    if not isinstance(value, str) or not TYPE_RE.match(value):
        raise ContractError("bad_type", f"{str(value)[:80]!r} does not match [a-z][a-z0-9_]{{0,31}}")
    return value


def sanitise_agent_id(name: str | None = None) -> str:
    """Turn a host name into a valid agent id (the default id)."""
    raw = name if name is not None else socket.gethostname()
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", raw).lstrip(".")[:64]
    return cleaned or "agent"


def is_reply_topic(candidate: object, response_base: str) -> bool:
    """Whether a request's ResponseTopic, `candidate`, is one an agent may answer on: a concrete
    topic (no wildcard, no NUL, at most MAX_TOPIC_BYTES) strictly under its `response_base`
    (Topics.response_base). Anything else would let a requester make the agent publish where it
    must not, or have the broker disconnect it for a malformed PUBLISH."""
    return (isinstance(candidate, str) and len(candidate) > len(response_base)
            and candidate.startswith(response_base)
            and "+" not in candidate and "#" not in candidate and "\x00" not in candidate
            and len(candidate.encode("utf-8")) <= MAX_TOPIC_BYTES)


# The simulator answers for 10,000 agents in one process, and checking the agent id again on every
# answer cost as much as the rest of the reply-topic rule.
@lru_cache(maxsize=16384)
def _response_base(prefix: str, agent_id: str) -> str:
    return f"{prefix}/{check_agent_id(agent_id)}/{RES}/"


@dataclass(frozen=True)
class ParsedTopic:
    kind: Kind
    agent_id: str
    type: str | None


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (config `mqtt.topic_prefix`)."""

    prefix: str = "fleet"

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ContractError("bad_prefix", f"topic prefix {self.prefix!r} must be plain topic levels")

    def request(self, agent_id: str, type_: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/{REQ}/{check_type(type_)}"

    def response(self, agent_id: str, type_: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/{RES}/{check_type(type_)}"

    def request_and_response(self, agent_id: str, type_: str) -> tuple[str, str]:
        """request() and response() of one agent and type, checked once: the controller asks
        thousands a second, and the second check cost more than the tuple build_request returns."""
        head, tail = f"{self.prefix}/{check_agent_id(agent_id)}/", f"/{check_type(type_)}"
        return f"{head}{REQ}{tail}", f"{head}{RES}{tail}"

    def status(self, agent_id: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/{STATUS}"

    def response_base(self, agent_id: str) -> str:
        """Every topic an agent may answer on starts with this."""
        return _response_base(self.prefix, agent_id)

    def reply(self, agent_id: str, type_: str, response_topic: object = None) -> str:
        """Where agent `agent_id` answers a `type_` request that named `response_topic` (its MQTT 5
        ResponseTopic, or None): that topic when is_reply_topic allows it, else its own
        <prefix>/<agent_id>/res/<type>. So mosquitto_rr can ask an agent by hand."""
        if isinstance(response_topic, str) and is_reply_topic(response_topic, self.response_base(agent_id)):
            return response_topic
        return self.response(agent_id, type_)

    # subscription filters
    def agent_requests(self, agent_id: str) -> str:
        return f"{self.prefix}/{check_agent_id(agent_id)}/{REQ}/+"

    def all_requests(self) -> str:
        return f"{self.prefix}/+/{REQ}/+"

    def all_responses(self) -> str:
        return f"{self.prefix}/+/{RES}/+"

    def all_responses_of(self, type_: str) -> str:
        """Every agent's answers of one type (a job waits on these)."""
        return f"{self.prefix}/+/{RES}/{check_type(type_)}"

    def all_status(self) -> str:
        return f"{self.prefix}/+/{STATUS}"

    @staticmethod
    def shared(topic_filter: str, group: str = SHARE_GROUP) -> str:
        """The filter as a member of share group `group`: the only place a `$share/...` string is made."""
        return f"$share/{group}/{topic_filter}"

    def parse(self, topic: str) -> ParsedTopic:
        """Split a concrete topic into kind, agent id and type; raise ContractError if it is not ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ContractError("bad_topic", f"{topic[:120]!r} is not under {head!r}")
        parts = topic[len(head):].split("/")
        if len(parts) == 2 and parts[1] == STATUS:
            return ParsedTopic(STATUS, check_agent_id(parts[0]), None)
        if len(parts) == 3 and parts[1] in (REQ, RES):
            kind: Kind = REQ if parts[1] == REQ else RES
            return ParsedTopic(kind, check_agent_id(parts[0]), check_type(parts[2]))
        raise ContractError("bad_topic", f"{topic[:120]!r} is not <prefix>/<agent>/(req|res)/<type> or status")
