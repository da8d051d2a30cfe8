""""Ask now" for a label selection: the jobs this dashboard started, and what a job page shows.

A job is fleet_common.jobrun's (the same as `fleetctl request --label`): it reads the fleet from
the broker's retained statuses, sends one request per matching agent with the job's id, and waits
for the online ones. Each runs in its own thread (its own event loop), so the operator's HTTP
request returns at once with the job's page, which polls. While the job waits, its tally is the
job's own count; afterwards it is the store's (requests.job, late answers included) over what the
dashboard knows it sent: who was queued, and who did not answer in time. A job this dashboard
did not start, or started before a restart, is the store's alone, as `fleetctl job` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

from fleet_common.config import Config
from fleet_common.errors import ContractError, FleetError
from fleet_common.jobs import ERROR, OK, AgentResult, Candidate, JobResult, JobSpec, Tally, new_job_id
from fleet_common.labels import Labels, check_labels
from fleet_common.timefmt import iso
from fleet_store import AgentRecord, StoreReader
from fleet_store.jobs import stored_job

log = logging.getLogger("fleet.dashboard")
OnTally = Callable[[Tally], None]
# (config, spec, the store's agents, on_tally, job id) -> the job's results when its wait is over
Runner = Callable[[Config, JobSpec, list[Candidate], OnTally, str], JobResult]


def run_over_mqtt(cfg: Config, spec: JobSpec, known: list[Candidate], on_tally: OnTally, job_id: str) -> JobResult:
    """The job over MQTT (fleet_common.jobrun), on this thread's own event loop."""
    from fleet_common.jobrun import JobRun  # aiomqtt: loaded only when an operator starts a job

    return asyncio.run(JobRun(cfg, spec, on_tally, "dashboard", job_id).run(known))


def job_request(body: Any) -> tuple[str, Labels]:
    """The type and labels of a POST /api/jobs body ({"type": "cpu", "labels": {"role": "web"}}),
    checked: FleetError says what is wrong."""
    if not isinstance(body, dict):
        raise FleetError('send a JSON object: {"type": "cpu", "labels": {"role": "web"}}')
    try:
        labels = check_labels(body.get("labels", {}))
    except ContractError as exc:
        raise FleetError(exc.detail) from None
    if not labels:
        raise FleetError("choose at least one label: ask now reaches a label selection of the fleet page")
    return str(body.get("type") or ""), labels


class TooManyJobs(FleetError):
    """As many jobs as the dashboard runs at once are still waiting."""


@dataclass
class StartedJob:
    """A job this dashboard started. `tally` is the job's live count, `result` its results when
    its wait ended, `error` why it could not run (nothing matched, the broker refused)."""

    job: str
    spec: JobSpec
    started_at: str
    tally: Tally | None = None
    result: JobResult | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.result is None and self.error is None


@dataclass(frozen=True)
class JobView:
    """What a job page and /api/job/<id> show. state: running, done, failed, or stored (a job this
    dashboard does not remember: the store's view alone)."""

    job: str
    type: str
    state: str
    tally: Tally
    results: list[AgentResult]
    selector: Labels | None = None
    started_at: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "type": self.type, "state": self.state, "selector": self.selector,
                "started_at": self.started_at, "error": self.error, **self.tally.to_dict(),
                "line": self.tally.line(), "results": [r.to_dict() for r in self.results]}


class DashboardJobs:
    """The jobs this dashboard started, newest last; at most `max_running` wait at once, and the
    newest `max_kept` are remembered (in memory: a restart forgets them, the store does not)."""

    max_running = 4
    max_kept = 200

    def __init__(self, cfg: Config, runner: Runner = run_over_mqtt) -> None:
        self.cfg, self.runner = cfg, runner
        self._jobs: dict[str, StartedJob] = {}
        self._lock = threading.Lock()

    def start(self, spec: JobSpec, known: list[Candidate]) -> StartedJob:
        """Start `spec` in a thread of its own; TooManyJobs if max_running are still waiting."""
        with self._lock:
            if sum(1 for j in self._jobs.values() if j.running) >= self.max_running:
                raise TooManyJobs(f"{self.max_running} jobs are still waiting for their answers; try again when "
                                  "one is done")
            job = StartedJob(new_job_id(), spec, iso(time.time()))
            self._jobs[job.job] = job
            for old in [j for j in self._jobs.values() if not j.running][:max(0, len(self._jobs) - self.max_kept)]:
                del self._jobs[old.job]
        threading.Thread(target=self._run, args=(job, known), name=f"dashboard-job-{job.job}", daemon=True).start()
        return job

    def _run(self, job: StartedJob, known: list[Candidate]) -> None:
        def on_tally(tally: Tally) -> None:
            job.tally = tally

        try:
            job.result = self.runner(self.cfg, job.spec, known, on_tally, job.job)
        except FleetError as exc:  # nothing matched, or the broker refused or went away
            job.error = str(exc)
        except Exception as exc:
            log.exception("job %s failed", job.job)
            job.error = f"the job failed ({type(exc).__name__}: {exc})"
        if job.result is not None:
            log.info("job %s (%s to %s) done: %s", job.job, job.spec.type, job.spec.describe(),
                     job.result.tally.line())
        else:
            log.warning("job %s (%s to %s): %s", job.job, job.spec.type, job.spec.describe(), job.error)

    def get(self, job_id: str) -> StartedJob | None:
        return self._jobs.get(job_id)

    def view(self, job_id: str, store: StoreReader, agents: Iterable[AgentRecord]) -> JobView | None:
        """The job as its page shows it; None if neither this dashboard nor the store knows it."""
        started = self.get(job_id)
        stored = stored_job(job_id, store.job_requests(job_id), agents)
        if started is None:
            if stored is None:
                return None
            return JobView(job_id, stored.type, "stored", stored.tally, by_agent(stored.results))
        spec = started.spec
        results = merged(started.result, stored)
        if started.running:
            tally = started.tally or Tally.of(results)
            state = "running"
        else:
            tally = Tally.of(results)
            state = "done" if started.error is None else "failed"
        return JobView(job_id, spec.type, state, tally, results, spec.selector, started.started_at, started.error)


def merged(sent: JobResult | None, stored: JobResult | None) -> list[AgentResult]:
    """Per agent: the store's answer if it has one (late answers too); else what the job itself
    concluded (no answer in time, queued); else the store's pending record."""
    out = {r.agent_id: r for r in sent.results} if sent is not None else {}
    for r in stored.results if stored is not None else ():
        if r.status in (OK, ERROR) or r.agent_id not in out:
            out[r.agent_id] = r
    return by_agent(out.values())


def by_agent(results: Iterable[AgentResult]) -> list[AgentResult]:
    return sorted(results, key=lambda r: r.agent_id)
