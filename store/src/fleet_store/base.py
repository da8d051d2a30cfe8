"""What every store does: the `StoreWriter` and `StoreReader` protocols (together `Store`), the
records they read and write, and the rules both implementations share (retention, latency, how a
status is ordered).

Timestamps are RFC 3339 UTC text with milliseconds everywhere in these records,
normalised with `fleet_common.iso`, so they sort as text.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from fleet_common import FleetError, Request, Response, Status, iso, parse_iso
from fleet_common.config import PersisterConfig
from fleet_common.timefmt import LATEST_S, is_canonical

from .trends import TrendRecord

M = TypeVar("M", Request, Response, Status)

STATES = ("pending", "ok", "error", "expired")
DEFAULT_RETENTION_S: Mapping[str, int] = PersisterConfig().retention_s
DEFAULT_TREND_RETENTION_S: int = PersisterConfig().trend_retention_s
EXPIRED_ERROR = {"code": "expired", "message": "no response before expires_at"}


class StoreError(FleetError):
    """The store cannot be opened or used; the message says what to check."""


class StoreMissing(StoreError):
    """A reader found no store where the config points: nothing has been stored there yet."""


class StoreUnreachable(StoreError):
    """The store's server did not answer (down, still starting, network): worth retrying,
    unlike a StoreError that names a configuration problem."""


# Where a raw message came from: its topic and payload, kept for a dead letter.
Source = tuple[str, bytes]


@dataclass(frozen=True)
class Incoming(Generic[M]):
    """A validated message as the persister received it.

    `agent_id` comes from the topic (a request payload does not name its agent).
    `received_at` is the persister's clock: what retention is counted from.
    `retained` marks a status delivered from the broker's retained store on subscribe:
    it is the broker's latest, but not news, so it does not move `last_seen` to now.
    `source` is the raw message, for the dead letter if the store refuses it.
    """

    message: M
    agent_id: str
    received_at: str
    retained: bool = False
    source: Source | None = field(default=None, compare=False, repr=False)


class EncodedJSON(str):
    """A value already encoded as JSON text (by a parse worker): a store that keeps JSON as
    text writes it as it is. Only stores that say so receive one (see `ENCODES_JSON`)."""


MAX_REJECTED_PAYLOAD = 2048


@dataclass(frozen=True)
class RejectedRecord:
    """A dead letter. `id` makes a retried batch idempotent; `payload` is the raw bytes,
    truncated to MAX_REJECTED_PAYLOAD, decoded as UTF-8 with errors='replace'; `reason` is a
    short stable code (what metrics count), `detail` says exactly what was wrong."""

    id: str
    received_at: str
    topic: str
    reason: str
    payload: str
    detail: str = ""


def dead_letter(topic: str, payload: bytes, reason: str, detail: str, received_at: str,
                id_: str | None = None) -> RejectedRecord:
    """A dead letter for a raw message. Without `id_`, the id is made from the message and the
    reason, so a store that writes it twice (a retried bulk write) keeps one."""
    if id_ is None:
        digest = hashlib.blake2b(digest_size=16)
        for part in (reason.encode(), topic.encode("utf-8", "replace"), received_at.encode(), payload):
            digest.update(len(part).to_bytes(8, "big") + part)
        id_ = digest.hexdigest()
    return RejectedRecord(id=id_, received_at=received_at, topic=topic[:512], reason=reason,
                          payload=payload[:MAX_REJECTED_PAYLOAD].decode("utf-8", errors="replace"),
                          detail=detail[:1000])


def refused(item: Incoming[Any], reason: str, detail: str) -> RejectedRecord:
    """The dead letter of a message the store will not apply; its raw form if the persister kept
    it, else the message written out again."""
    topic, payload = item.source or ("", _json_bytes(item.message.to_dict()))
    return dead_letter(topic, payload, reason, detail, item.received_at)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


@dataclass
class Batch:
    requests: list[Incoming[Request]] = field(default_factory=list)
    responses: list[Incoming[Response]] = field(default_factory=list)
    statuses: list[Incoming[Status]] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests) + len(self.responses) + len(self.statuses) + len(self.rejected)


@dataclass(frozen=True)
class RequestRecord:
    id: str
    agent_id: str
    type: str
    params: dict[str, Any] | None
    issued_at: str | None
    expires_at: str | None
    state: str
    answered_at: str | None
    latency_ms: float | None
    data: dict[str, Any] | None
    error: dict[str, Any] | None
    expire_at: str | None
    collected_at: str | None = None  # as the agent's clock said
    received_at: str | None = None  # when a persister received the answer, by its clock
    job: str | None = None  # the job the request was sent in (fleetctl request --all|--label)


@dataclass(frozen=True)
class LatestRecord:
    """The newest ok answer of one agent and type: the `latest` table (collection), one per
    (agent_id, type), written with the batch that stores the answer. Newest by `answered_at`,
    then `id`; an older answer arriving later never replaces it, error and expired answers never
    do, and it stays when retention deletes its request (see docs/wire-contract.md, "Storage")."""

    agent_id: str
    type: str
    id: str
    answered_at: str
    data: dict[str, Any] | None

    def request(self) -> RequestRecord:
        """As the RequestRecord `latest()` returns: state ok, and only what the row keeps filled
        (the request's params, issue time, latency: `get_request(id)`, while it is retained)."""
        return RequestRecord(id=self.id, agent_id=self.agent_id, type=self.type, params=None, issued_at=None,
                             expires_at=None, state="ok", answered_at=self.answered_at, latency_ms=None,
                             data=self.data, error=None, expire_at=None)


def newest_per_key(records: list[LatestRecord]) -> list[LatestRecord]:
    """The newest of each (agent_id, type), as the latest table keeps it, sorted by agent and type."""
    out: dict[tuple[str, str], LatestRecord] = {}
    for r in records:
        found = out.get((r.agent_id, r.type))
        if found is None or (r.answered_at, r.id) > (found.answered_at, found.id):
            out[r.agent_id, r.type] = r
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True)
class AgentRecord:
    """`online` is None for an agent known only from its responses (no status seen yet).
    `status_at` is when the persister received the status that set `online`: statuses are
    ordered by it, not by the agent's `ts`, because a Last Will carries the `ts` of the
    connect that armed it, which is older than the birth that followed."""

    agent_id: str
    online: bool | None
    first_seen: str
    last_seen: str
    hostname: str | None
    platform: str | None
    agent_version: str | None
    types: list[str] | None
    status_at: str | None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stats:
    """Requests of one agent in a window: `answered` counts state ok or error,
    `errors` state error, `expired` state expired; latency over answered requests."""

    issued: int = 0
    answered: int = 0
    expired: int = 0
    errors: int = 0
    median_latency_ms: float | None = None


class StoreWriter(Protocol):
    """The persister's side, its batch path: the only writer to storage."""

    def write(self, batch: Batch) -> list[RejectedRecord]:
        """Apply the whole batch in one transaction (SQLite) or idempotent bulk writes
        (MongoDB); raising means nothing was acknowledged and the batch will be retried.

        An answer is stored against a request only if it comes from the request's agent and
        type (see `resolve`); what the store turns away that way is written to `rejected` in
        the same write and returned, so the persister can count it."""

    def refuses(self, exc: BaseException) -> bool:
        """True if `exc`, raised by write(), says the store cannot take this data (a value it
        cannot hold: a retry cannot help); False for what may pass later (locked, unreachable,
        or not known to be about the data). The persister splits a batch refused so until it
        finds the messages at fault; anything else it retries as it is."""

    def expire_pending(self, now_s: float, grace_s: float) -> int:
        """Mark pending requests whose expires_at < now - grace as expired; return how many."""

    def purge(self, now_s: float) -> int:
        """Delete requests and rejected records past their retention; return how many requests."""

    def close(self) -> None: ...


class StoreReader(Protocol):
    """The side fleetctl and the dashboard use: status, history and fleet views."""

    def agents(self) -> list[AgentRecord]: ...

    def agent_stats(self, since_s: float) -> dict[str, Stats]: ...

    def history(self, agent_id: str, type_: str, limit: int = 100,
                since_s: float | None = None) -> list[RequestRecord]:
        """Requests of one agent and type, newest issued first."""

    def get_request(self, id_: str) -> RequestRecord | None: ...

    def job_requests(self, job_id: str) -> list[RequestRecord]:
        """The requests sent in job `job_id`, by agent id (an indexed read)."""

    def latest(self, type_: str, since_s: float | None = None,
               fields: Sequence[str] | None = None) -> dict[str, RequestRecord]:
        """The newest answered (state ok) request of `type_` per agent, answered since `since_s`,
        from the latest table: one indexed range, so a fleet page of thousands stays fast. The
        records are `LatestRecord.request()`: id, agent, type, state ok, answered_at and data.
        With `fields`, data holds only those top-level keys (null where absent), cut down by the
        store: a fleet's processes answers are gigabytes, their `total`s a few kilobytes. (SQLite
        writes the cut-down floats with 15 significant digits: ask for whole data to keep all 17.)"""

    def latest_all(self, types: Collection[str] | None = None) -> list[LatestRecord]:
        """Every latest row (of `types`, if given), sorted by agent_id and type: one per agent and
        type that has ever answered ok, kept beyond retention."""

    def recent_requests(self, agent_id: str, limit: int = 50) -> list[RequestRecord]:
        """Requests of one agent across all types, newest issued first."""

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        """Dead letters, newest first."""

    def trends(self, agent_id: str, series: str, since_s: float, until_s: float) -> list[TrendRecord]:
        """The hourly trend of one agent's series (trends.SERIES) for the hours from the one
        `since_s` falls in up to `until_s`, by key (mountpoint, interface; '' for host-wide) and hour."""

    def count_requests(self, *, agent_id: str | None = None, type_: str | None = None,
                       state: str | None = None) -> int: ...

    def type_counts(self) -> dict[str, dict[str, int]]:
        """Requests per type and state: {"cpu": {"ok": 12, "pending": 1}, ...}."""

    def close(self) -> None: ...


class Store(StoreWriter, StoreReader, Protocol):
    """Both sides, as each implementation and open_store provide them."""


# Rules shared by the implementations.

# Errors a store raises about a value it cannot hold, whichever the store: a retry cannot help.
DATA_ERRORS = (ValueError, TypeError, OverflowError, UnicodeError, RecursionError)


FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_fields(fields: Sequence[str]) -> list[str]:
    """`latest(fields=...)`'s names: plain top-level keys (they go into a query's text)."""
    for name in fields:
        if not FIELD_RE.match(name):
            raise ValueError(f"{name!r} is not a field name")
    return list(fields)


def norm_ts(text: str | None) -> str | None:
    """Any RFC 3339 timestamp as UTC with milliseconds, so stored times compare as text."""
    if text is None or is_canonical(text):
        return text
    return iso(parse_iso(text))


_EXPIRY_HEADS: dict[tuple[str, int], str] = {}


def retention_until(received_at: str, type_: str, retention_s: Mapping[str, int]) -> str:
    """When a record received at `received_at` (the persister's clock, never the sender's) may go.
    Retention is whole seconds, so the milliseconds are received_at's: the rest is cached per
    second, as the writer computes one per message."""
    keep = retention_s.get(type_, retention_s["default"])
    if not is_canonical(received_at):
        return iso(min(parse_iso(received_at) + keep, LATEST_S))
    key = (received_at[:19], keep)
    head = _EXPIRY_HEADS.get(key)
    if head is None:
        if len(_EXPIRY_HEADS) > 1024:
            _EXPIRY_HEADS.clear()
        head = _EXPIRY_HEADS[key] = iso(min(parse_iso(received_at[:19] + ".000Z") + keep, LATEST_S))[:19]
    if head >= "9999-12-31T23:59:59":  # the last second the text can hold: exactly
        return iso(min(parse_iso(received_at) + keep, LATEST_S))
    return head + received_at[19:]


# How far the clocks of controller, agent and persister may disagree before an agent's
# collected_at is no longer believed (see answer_time).
CLOCK_TOLERANCE_S = 2.0


def answer_time(collected_at: str | None, received_at: str, issued_at: str | None = None) -> str:
    """When the request was answered. The agent's collected_at, where its clock agrees with the
    others: not after the persister received the answer, not before the request was issued
    (either by more than CLOCK_TOLERANCE_S); else when the persister received it. So an answer
    that waited in an agent's outbox keeps its time, and an agent whose clock is an hour off
    gets the persister's instead of a time an hour away."""
    if collected_at is None:
        return received_at
    # Stored times are canonical text, which sorts as time does: the usual case, collected after
    # the request was issued and before the answer was received, needs no parsing.
    if collected_at <= received_at and (issued_at is None or issued_at <= collected_at):
        return collected_at
    received, collected = parse_iso(received_at), parse_iso(collected_at)
    if collected > received + CLOCK_TOLERANCE_S:
        return received_at
    if issued_at is not None:
        issued = parse_iso(issued_at)
        if collected < issued - CLOCK_TOLERANCE_S:
            return received_at
        collected = max(collected, issued)
    return iso(min(collected, received))


def latency_ms(issued_at: str | None, answered_at: str | None) -> float | None:
    if issued_at is None or answered_at is None:
        return None
    return round(max(0.0, parse_iso(answered_at) - parse_iso(issued_at)) * 1000.0, 3)


class Owner(NamedTuple):
    """Whose a stored request record is: the agent and type its request was sent to, or, until
    the request is seen (an answer may arrive first), those of the answer stored first."""

    agent_id: str
    type: str
    requested: bool


@dataclass
class Resolved:
    """A batch sorted by `resolve`: what to apply, which stored answers its requests displace
    (stored record ids), and the dead letters of what it turns away."""

    requests: list[Incoming[Request]] = field(default_factory=list)
    responses: list[Incoming[Response]] = field(default_factory=list)
    displaced: dict[str, Owner] = field(default_factory=dict)
    refused: list[RejectedRecord] = field(default_factory=list)


def resolve(batch: Batch, owners: dict[str, Owner]) -> Resolved:
    """Bind every message of `batch` to its request record, given the owners of the records
    already stored (`owners`, updated in place). The request decides: a record belongs to the
    agent and type its request was sent to. So, whichever arrives first:

    - an answer from another agent, or on another type, is refused (`request_mismatch`);
    - an answer stored before its request arrived, from another agent or type than the
      request's, is displaced to `rejected` when the request comes;
    - a request id already sent to another agent or for another type is refused.

    No record ever holds one agent's answer under another agent's request."""
    out = Resolved()
    for item in batch.requests:
        id_, mine = item.message.id, Owner(item.agent_id, item.message.type, True)
        found = owners.get(id_)
        if found is None or found[:2] == mine[:2]:
            owners[id_] = mine
            out.requests.append(item)
        elif not found.requested:
            out.displaced[id_] = mine
            owners[id_] = mine
            out.requests.append(item)
        else:
            out.refused.append(refused(item, "request_mismatch", f"request id {id_} was sent to agent "
                                       f"{found.agent_id!r} for type {found.type!r} already"))
    for res in batch.responses:
        id_, mine = res.message.id, Owner(res.agent_id, res.message.type, False)
        found = owners.get(id_)
        if found is None:
            owners[id_] = mine
            out.responses.append(res)
        elif found[:2] == mine[:2]:
            out.responses.append(res)
        else:
            whose = "was sent to" if found.requested else "was answered first by"
            out.refused.append(refused(res, "request_mismatch", f"answer from agent {mine.agent_id!r} for type "
                                       f"{mine.type!r} to request {id_}, which {whose} agent {found.agent_id!r} "
                                       f"for type {found.type!r}"))
    return out


def displaced_letter(record: RequestRecord, request: Owner) -> RejectedRecord:
    """The dead letter of a stored answer whose request turned out to be another agent's or type's."""
    envelope = Response(id=record.id, agent_id=record.agent_id, type=record.type,
                        status="error" if record.state in ("error", "expired") else "ok", data=record.data,
                        error=record.error, collected_at=record.collected_at or "").to_dict()
    detail = (f"answer from agent {record.agent_id!r} for type {record.type!r}, stored before request "
              f"{record.id} arrived, which was sent to agent {request.agent_id!r} for type {request.type!r}")
    topic = f"<answer to {record.id}, stored and then displaced>"
    return dead_letter(topic, _json_bytes(envelope), "request_mismatch", detail,
                       record.received_at or record.answered_at or "")


def response_state(response: Response) -> str:
    if response.status == "error" and (response.error or {}).get("code") == "expired":
        return "expired"
    return response.status


def birth_labels(status: Status) -> dict[str, str] | None:
    """The labels a status sets: a birth sets them (none given is none), a Last Will or goodbye
    leaves the last birth's in place (None)."""
    return (status.labels or {}) if status.online else None


def seen_at(item: Incoming[Status]) -> str:
    """When the agent was last heard of: now, unless this is an old retained status."""
    if item.retained:
        return min(norm_ts(item.message.ts) or item.received_at, item.received_at)
    return item.received_at


def summarise_counts(counts: list[tuple[str, str, int]], latencies: dict[str, list[float]]) -> dict[str, Stats]:
    """(agent_id, state, n) rows and answered latencies per agent -> Stats per agent."""
    by_agent: dict[str, dict[str, int]] = {}
    for agent_id, state, n in counts:
        by_agent.setdefault(agent_id, {s: 0 for s in STATES})[state] = int(n)
    out = {}
    for agent_id, c in by_agent.items():
        lat = latencies.get(agent_id)
        out[agent_id] = Stats(issued=sum(c.values()), answered=c["ok"] + c["error"], expired=c["expired"],
                              errors=c["error"], median_latency_ms=statistics.median(lat) if lat else None)
    return out


def summarise(rows: list[tuple[str, str, float | None]]) -> dict[str, Stats]:
    """(agent_id, state, latency_ms) rows -> Stats per agent."""
    counts: dict[tuple[str, str], int] = {}
    latencies: dict[str, list[float]] = {}
    for agent_id, state, latency in rows:
        counts[agent_id, state] = counts.get((agent_id, state), 0) + 1
        if state in ("ok", "error") and latency is not None:
            latencies.setdefault(agent_id, []).append(latency)
    return summarise_counts([(a, s, n) for (a, s), n in counts.items()], latencies)
