"""A job's tally read back from the store (`fleetctl job`): its requests (`requests.job`) and
what became of each, including answers that came after the job stopped waiting, from agents
that came back while their request still waited at the broker."""

from __future__ import annotations

from collections.abc import Iterable

from fleet_common.jobs import ERROR, NO_ANSWER, OK, QUEUED, WAITING, AgentResult, Candidate, JobResult

from .base import AgentRecord, RequestRecord


def known_agents(agents: Iterable[AgentRecord]) -> list[Candidate]:
    """The store's agents as a job's candidates (fleet_common.jobrun.JobRun.run's `known`): the
    labels of agents that are offline now, whose status carries none."""
    return [Candidate(a.agent_id, bool(a.online), dict(a.labels)) for a in agents]


def stored_result(record: RequestRecord, online: bool) -> AgentResult:
    """One request of a job as the store has it. Pending: waiting if its agent is online now, else
    queued. Expired without an answer (the persister's expiry): no_answer. An answer, whatever it
    says (an agent answers `expired` to a request it got too late), counts as answered."""
    if record.state == OK:
        status = OK
    elif record.state == ERROR or (record.state == "expired" and record.answered_at is not None):
        status = ERROR
    elif record.state == "expired":
        status = NO_ANSWER
    else:
        status = WAITING if online else QUEUED
    answered = status in (OK, ERROR)
    return AgentResult(record.agent_id, status, record.id, record.latency_ms if answered else None,
                       record.data if answered else None, record.error if status != OK else None)


def stored_job(job_id: str, records: Iterable[RequestRecord], agents: Iterable[AgentRecord]) -> JobResult | None:
    """The job's results from its stored requests (StoreReader.job_requests) and the agents table;
    None if the store holds none of its requests."""
    records = list(records)
    if not records:
        return None
    online = {a.agent_id: bool(a.online) for a in agents}
    return JobResult(job_id, records[0].type, [stored_result(r, online.get(r.agent_id, False)) for r in records])


__all__ = ["known_agents", "stored_job", "stored_result"]
