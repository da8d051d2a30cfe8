"""Jobs: one request sent to every agent of a selection at once (`fleetctl request --all` or
`--label k=v`, the dashboard's "ask now" for a label selection), and how its answers are counted.

This module is the part of a job that needs no network: who is targeted, the per-agent results
and their tally. Sending and waiting is `fleet_common.jobrun` (asyncio, aiomqtt), which only
fleetctl and the dashboard import; the agent never does. The store's side, a job's tally read
back later (`fleetctl job`), is `fleet_store.jobs`.

Who a job reaches: every matching agent. Those online when the job starts are *targeted*: the job
waits for their answers, each for up to the job's timeout. Matching agents that are offline are
sent the request all the same (it waits for them at the broker until it expires) and counted
*queued*, not waited for; one that answers while the job still waits counts as targeted from then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import FleetError
from .labels import Labels, format_labels, matches
from .messages import JsonObject, Status
from .timefmt import is_valid_id, new_id
from .topics import check_type

DEFAULT_EXPIRES_S = 3600.0  # how long a job's requests wait at the broker for an offline agent
DEFAULT_TIMEOUT_S = 10.0  # how long a job waits for each online agent's answer

# What became of one agent's request. Answered: ok, error. Targeted: those and no_answer, waiting.
OK, ERROR, NO_ANSWER, WAITING, QUEUED = "ok", "error", "no_answer", "waiting", "queued"
RESULT_STATUSES = (OK, ERROR, NO_ANSWER, WAITING, QUEUED)


def new_job_id() -> str:
    """A job id: time-ordered like a request id (fleet_common.timefmt.new_id), of the same syntax."""
    return new_id()


def check_job_id(value: object) -> str:
    """`value` as a job id, or FleetError saying what one looks like."""
    if not is_valid_id(value):
        raise FleetError(f"{str(value)[:80]!r} is not a job id (1-64 characters of [A-Za-z0-9_-]; "
                         "'fleetctl request --all' prints the id of the job it sent)")
    return str(value)


@dataclass(frozen=True)
class JobSpec:
    """What a job asks and of whom: `selector` None is every known agent, else those whose labels
    include every pair (an empty selector is everyone too). Units are in the names."""

    type: str
    params: JsonObject = field(default_factory=dict)
    selector: Labels | None = None
    expires_s: float = DEFAULT_EXPIRES_S
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        check_type(self.type)
        for name, value in (("expires", self.expires_s), ("timeout", self.timeout_s)):
            if not 0 < value < float("inf"):
                raise FleetError(f"--{name} must be more than 0 seconds, not {value:g}")

    def describe(self) -> str:
        """Whom the job asks, for people: "every known agent" or "agents labelled role=web"."""
        if not self.selector:
            return "every known agent"
        return f"agents labelled {format_labels(self.selector)}"


@dataclass(frozen=True)
class Candidate:
    """An agent a job may reach: whether it is online now, and its labels."""

    agent_id: str
    online: bool
    labels: Labels = field(default_factory=dict)


def candidates(statuses: Mapping[str, Status] | None, stored: Iterable[Candidate] = ()) -> list[Candidate]:
    """The fleet a job chooses from, by agent id.

    With the broker's retained statuses (`statuses`), the fleet is the agents that have one, as the
    controller sees it: online as the status says. A Last Will carries no labels, so an offline
    agent's come from the store's agents table (`stored`, from its last birth). Without them
    (None: the broker would not let this user read them), the store's agents and what it last heard."""
    known = {c.agent_id: c for c in stored}
    if statuses is None:
        return sorted(known.values(), key=lambda c: c.agent_id)
    out = []
    for agent_id, status in sorted(statuses.items()):
        labels = status.labels if status.online else None
        if labels is None:
            last = known.get(agent_id)
            labels = last.labels if last is not None else {}
        out.append(Candidate(agent_id, status.online, dict(labels)))
    return out


def select(fleet: Iterable[Candidate], spec: JobSpec) -> list[Candidate]:
    """The agents of `fleet` that `spec` reaches, by agent id."""
    return sorted((c for c in fleet if matches(c.labels, spec.selector or {})), key=lambda c: c.agent_id)


@dataclass
class AgentResult:
    """One agent's part of a job. `latency_ms`: from sending the request to its answer."""

    agent_id: str
    status: str
    request_id: str = ""
    latency_ms: float | None = None
    data: JsonObject | None = None
    error: JsonObject | None = None

    @property
    def targeted(self) -> bool:
        return self.status != QUEUED

    def to_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "status": self.status, "request_id": self.request_id,
                "latency_ms": self.latency_ms, "data": self.data, "error": self.error}


@dataclass(frozen=True)
class Tally:
    """A job's counts: targeted = answered + no_answer + waiting, answered = ok + errors; queued
    agents are the offline ones not waited for (not targeted)."""

    targeted: int = 0
    answered: int = 0
    ok: int = 0
    errors: int = 0
    no_answer: int = 0
    queued: int = 0
    waiting: int = 0

    @classmethod
    def of(cls, results: Iterable[AgentResult]) -> Tally:
        counts = dict.fromkeys(RESULT_STATUSES, 0)
        for r in results:
            counts[r.status] += 1
        ok, errors, no_answer, waiting = counts[OK], counts[ERROR], counts[NO_ANSWER], counts[WAITING]
        return cls(targeted=ok + errors + no_answer + waiting, answered=ok + errors, ok=ok, errors=errors,
                   no_answer=no_answer, queued=counts[QUEUED], waiting=waiting)

    def line(self) -> str:
        """`targeted 240 · answered 231 (96%) · errors 2 · waiting 7 · queued 12`: the live tally."""
        share = f" ({self.answered * 100 // self.targeted}%)" if self.targeted else ""
        parts = [f"targeted {self.targeted}", f"answered {self.answered}{share}", f"errors {self.errors}"]
        if self.waiting:
            parts.append(f"waiting {self.waiting}")
        if self.no_answer:
            parts.append(f"no answer {self.no_answer}")
        parts.append(f"queued {self.queued}")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, int]:
        return {"targeted": self.targeted, "answered": self.answered, "ok": self.ok, "errors": self.errors,
                "no_answer": self.no_answer, "queued": self.queued, "waiting": self.waiting}


@dataclass
class JobResult:
    """A job and its results, one per agent it was sent to, by agent id."""

    job: str
    type: str
    results: list[AgentResult]

    @property
    def tally(self) -> Tally:
        return Tally.of(self.results)

    @property
    def all_ok(self) -> bool:
        """Every targeted agent answered ok (and at least one was targeted): what exits 0."""
        tally = self.tally
        return tally.targeted > 0 and tally.ok == tally.targeted

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object: job, type, the tally's counts, and the results."""
        return {"job": self.job, "type": self.type, **self.tally.to_dict(),
                "results": [r.to_dict() for r in sorted(self.results, key=lambda r: r.agent_id)]}


__all__ = ["DEFAULT_EXPIRES_S", "DEFAULT_TIMEOUT_S", "ERROR", "NO_ANSWER", "OK", "QUEUED", "RESULT_STATUSES",
           "WAITING", "AgentResult", "Candidate", "JobResult", "JobSpec", "Tally", "candidates", "check_job_id",
           "new_job_id", "select"]
