"""What every store does: the `Store` protocol, the records it reads and writes, and the
rules both implementations share (retention, latency, how a status is ordered).

Timestamps are RFC 3339 UTC text with milliseconds everywhere in these records,
normalised with `fleet_common.iso`, so they sort as text.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Generic, List, Mapping, Optional, Protocol, TypeVar

from fleet_common import FleetError, Request, Response, Status, iso, parse_iso
from fleet_common.config import PersisterConfig
from fleet_common.timefmt import is_canonical

M = TypeVar("M", Request, Response, Status)

STATES = ("pending", "ok", "error", "expired")
DEFAULT_RETENTION_S: Mapping[str, int] = PersisterConfig().retention_s
EXPIRED_ERROR = {"code": "expired", "message": "no response before expires_at"}


class StoreError(FleetError):
    """The store cannot be opened or used; the message says what to check."""


class StoreUnreachable(StoreError):
    """The store's server did not answer (down, still starting, network): worth retrying,
    unlike a StoreError that names a configuration problem."""


@dataclass(frozen=True)
class Incoming(Generic[M]):
    """A validated message as the persister received it.

    `agent_id` comes from the topic (a request payload does not name its agent).
    `retained` marks a status delivered from the broker's retained store on subscribe:
    it is the broker's latest, but not news, so it does not move `last_seen` to now.
    """

    message: M
    agent_id: str
    received_at: str
    retained: bool = False


class EncodedJSON(str):
    """A value already encoded as JSON text (by a parse worker): a store that keeps JSON as
    text writes it as it is. Only stores that say so receive one (see `ENCODES_JSON`)."""


@dataclass(frozen=True)
class RejectedRecord:
    """A dead letter. `id` makes a retried batch idempotent; `payload` is the raw bytes,
    truncated to MAX_REJECTED_PAYLOAD, decoded as UTF-8 with errors='replace'."""

    id: str
    received_at: str
    topic: str
    reason: str
    payload: str


@dataclass
class Batch:
    requests: List[Incoming[Request]] = field(default_factory=list)
    responses: List[Incoming[Response]] = field(default_factory=list)
    statuses: List[Incoming[Status]] = field(default_factory=list)
    rejected: List[RejectedRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests) + len(self.responses) + len(self.statuses) + len(self.rejected)


@dataclass(frozen=True)
class RequestRecord:
    id: str
    agent_id: str
    type: str
    params: Optional[Dict[str, Any]]
    issued_at: Optional[str]
    expires_at: Optional[str]
    state: str
    answered_at: Optional[str]
    latency_ms: Optional[float]
    data: Optional[Dict[str, Any]]
    error: Optional[Dict[str, Any]]
    expire_at: Optional[str]


@dataclass(frozen=True)
class AgentRecord:
    """`online` is None for an agent known only from its responses (no status seen yet).
    `status_at` is when the persister received the status that set `online`: statuses are
    ordered by it, not by the agent's `ts`, because a Last Will carries the `ts` of the
    connect that armed it, which is older than the birth that followed."""

    agent_id: str
    online: Optional[bool]
    first_seen: str
    last_seen: str
    hostname: Optional[str]
    platform: Optional[str]
    agent_version: Optional[str]
    types: Optional[List[str]]
    status_at: Optional[str]


@dataclass(frozen=True)
class Stats:
    """Requests of one agent in a window: `answered` counts state ok or error,
    `errors` state error, `expired` state expired; latency over answered requests."""

    issued: int = 0
    answered: int = 0
    expired: int = 0
    errors: int = 0
    median_latency_ms: Optional[float] = None


class Store(Protocol):
    """The only writer is the persister; fleetctl and dashboards use the read side."""

    def write(self, batch: Batch) -> None:
        """Apply the whole batch in one transaction (SQLite) or one idempotent bulk write
        (MongoDB); raising means nothing was acknowledged and the batch will be retried."""

    def expire_pending(self, now_s: float, grace_s: float) -> int:
        """Mark pending requests whose expires_at < now - grace as expired; return how many."""

    def purge(self, now_s: float) -> int:
        """Delete requests and rejected records past their retention; return how many requests."""

    def agents(self) -> List[AgentRecord]: ...

    def agent_stats(self, since_s: float) -> Dict[str, Stats]: ...

    def history(self, agent_id: str, type_: str, limit: int = 100,
                since_s: Optional[float] = None) -> List[RequestRecord]:
        """Requests of one agent and type, newest issued first."""

    def get_request(self, id_: str) -> Optional[RequestRecord]: ...

    def latest(self, type_: str, since_s: Optional[float] = None) -> Dict[str, RequestRecord]:
        """The newest answered (state ok) request of `type_` per agent, issued since `since_s`:
        one indexed read per agent, so a fleet page of thousands stays fast."""

    def recent_requests(self, agent_id: str, limit: int = 50) -> List[RequestRecord]:
        """Requests of one agent across all types, newest issued first."""

    def rejected(self, limit: int = 100) -> List[RejectedRecord]:
        """Dead letters, newest first."""

    def count_requests(self, *, agent_id: Optional[str] = None, type_: Optional[str] = None,
                       state: Optional[str] = None) -> int: ...

    def type_counts(self) -> Dict[str, Dict[str, int]]:
        """Requests per type and state: {"cpu": {"ok": 12, "pending": 1}, ...}."""

    def close(self) -> None: ...


# Rules shared by the implementations.

def norm_ts(text: Optional[str]) -> Optional[str]:
    """Any RFC 3339 timestamp as UTC with milliseconds, so stored times compare as text."""
    if text is None or is_canonical(text):
        return text
    return iso(parse_iso(text))


def retention_until(base: str, type_: str, retention_s: Mapping[str, int]) -> str:
    return iso(parse_iso(base) + retention_s.get(type_, retention_s["default"]))


def latency_ms(issued_at: Optional[str], answered_at: Optional[str]) -> Optional[float]:
    if issued_at is None or answered_at is None:
        return None
    return round((parse_iso(answered_at) - parse_iso(issued_at)) * 1000.0, 3)


def response_state(response: Response) -> str:
    if response.status == "error" and (response.error or {}).get("code") == "expired":
        return "expired"
    return response.status


def seen_at(item: Incoming[Status]) -> str:
    """When the agent was last heard of: now, unless this is an old retained status."""
    if item.retained:
        return min(norm_ts(item.message.ts) or item.received_at, item.received_at)
    return item.received_at


def summarise_counts(counts: List[tuple[str, str, int]], latencies: Dict[str, List[float]]) -> Dict[str, Stats]:
    """(agent_id, state, n) rows and answered latencies per agent -> Stats per agent."""
    by_agent: Dict[str, Dict[str, int]] = {}
    for agent_id, state, n in counts:
        by_agent.setdefault(agent_id, {s: 0 for s in STATES})[state] = int(n)
    out = {}
    for agent_id, c in by_agent.items():
        lat = latencies.get(agent_id)
        out[agent_id] = Stats(issued=sum(c.values()), answered=c["ok"] + c["error"], expired=c["expired"],
                              errors=c["error"], median_latency_ms=statistics.median(lat) if lat else None)
    return out


def summarise(rows: List[tuple[str, str, Optional[float]]]) -> Dict[str, Stats]:
    """(agent_id, state, latency_ms) rows -> Stats per agent."""
    counts: Dict[tuple[str, str], int] = {}
    latencies: Dict[str, List[float]] = {}
    for agent_id, state, latency in rows:
        counts[agent_id, state] = counts.get((agent_id, state), 0) + 1
        if state in ("ok", "error") and latency is not None:
            latencies.setdefault(agent_id, []).append(latency)
    return summarise_counts([(a, s, n) for (a, s), n in counts.items()], latencies)
