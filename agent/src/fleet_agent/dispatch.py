"""The dispatcher: runs each job's collector on a bounded pool of workers, and a watchdog
answers `timeout` for any job whose collector takes longer than timeout_s. Whichever comes
first (result or timeout) answers; the other is dropped. No collector can stop the agent.

Python cannot kill a thread: when every worker is stuck past its timeout (a collector hung,
e.g. on a dead network mount), the dispatcher leaves them behind and starts a new pool, at
most MAX_POOL_REPLACEMENTS times.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fleet_common.errors import ContractError
from fleet_common.messages import Response, check_document

from .collectors import BadParams, Collector, jsonable
from .intake import Job

log = logging.getLogger("fleet.agent")

MAX_POOL_REPLACEMENTS = 3

AnswerFn = Callable[[Job, Response], bool]  # False: the job was answered already
DropFn = Callable[[str, str], None]  # (topic, why)


def collect(job: Job, collector: Collector, agent_id: str) -> Response:
    """Run `collector` for `job` and make its answer: a failing or misbehaving collector is an
    error answer (`bad_request` for BadParams, else `collector_failed`), never an exception."""
    started = time.monotonic()
    type_ = job.req.type
    try:
        data = collector(dict(job.req.params))
        if not isinstance(data, dict):
            raise TypeError(f"collector returned {type(data).__name__}, not an object")
        data = jsonable(data)  # JSON types only, so the answer always encodes
        check_document(data)
        return Response.ok(job.req.id, agent_id, type_, data, (time.monotonic() - started) * 1000.0)
    except BadParams as exc:
        return Response.fail(job.req.id, agent_id, type_, "bad_request", str(exc)[:1000], duration_ms=_ms(started))
    except ContractError as exc:
        return Response.fail(job.req.id, agent_id, type_, "collector_failed",
                             f"result breaks the contract: {exc}"[:1000], duration_ms=_ms(started))
    except Exception as exc:  # a failing collector is an answer, not a crash
        message = str(exc) or type(exc).__name__
        return Response.fail(job.req.id, agent_id, type_, "collector_failed", message[:1000],
                             duration_ms=_ms(started))


def timed_out(job: Job, agent_id: str, timeout_s: float) -> Response:
    return Response.fail(job.req.id, agent_id, job.req.type, "timeout", f"collector took longer than {timeout_s:g} s",
                         duration_ms=round(job.elapsed_ms(), 3))


class Watchdog:
    """Calls on_timeout(job) for every job still unanswered timeout_s after it was watched, from
    one thread for all jobs (a threading.Timer per request started a thread per request).

    Every job has the same timeout, so deadlines come in the order jobs are watched: a queue, not
    a heap. The thread sleeps until the oldest job's deadline; there it takes the unanswered jobs
    that are due and forgets every answered one, so it wakes about twice per timeout_s however
    many requests come, instead of once per request. Each wake-up is two context switches, and on
    a virtual machine those cost the agent more CPU than most of its collectors."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[Job], None]) -> None:
        self.timeout_s, self._on_timeout = timeout_s, on_timeout
        self._jobs: collections.deque[tuple[float, Job]] = collections.deque()
        self._cond = threading.Condition()
        self._idle = True  # waiting with no deadline: a new job must wake it
        self._stopped = False
        self.wakeups = 0
        self._thread = threading.Thread(target=self._run, name="collector-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, job: Job) -> None:
        with self._cond:
            self._jobs.append((time.monotonic() + self.timeout_s, job))
            if self._idle:
                self._idle = False
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _due(self, now: float) -> list[Job]:
        """At a deadline: the unanswered jobs past theirs; answered jobs are forgotten. Caller holds _cond."""
        due: list[Job] = []
        if self._jobs and self._jobs[0][0] <= now:
            kept: collections.deque[tuple[float, Job]] = collections.deque()
            for deadline, job in self._jobs:
                if job.answered:
                    continue
                if deadline <= now:
                    due.append(job)
                else:
                    kept.append((deadline, job))
            self._jobs = kept
        return due

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._due(time.monotonic())
                while not due and not self._stopped:
                    self._idle = not self._jobs
                    self._cond.wait(self._jobs[0][0] - time.monotonic() if self._jobs else None)
                    self.wakeups += 1
                    due = self._due(time.monotonic())
                if self._stopped:
                    return
            for job in due:
                if job.answered:
                    continue
                try:
                    self._on_timeout(job)
                except Exception:  # the watchdog must outlive one failed answer
                    log.exception("answering a timed-out %s request failed", job.req.type)


class Dispatcher:
    """Dispatcher(agent_id, workers, timeout_s, answer, drop): submit(job, collector) runs the
    collector on a worker and calls answer(job, response) with its result, or with `timeout`
    from the watchdog; drop(topic, why) for a job submitted after stop()."""

    def __init__(self, agent_id: str, workers: int, timeout_s: float, answer: AnswerFn, drop: DropFn) -> None:
        self.agent_id, self.workers, self.timeout_s = agent_id, workers, timeout_s
        self._answer, self._drop = answer, drop
        self._pool: ThreadPoolExecutor | None = None
        self._watchdog = Watchdog(timeout_s, self._on_timeout)
        self._lock = threading.Lock()
        self._active: dict[int, float] = {}  # running collectors: id(job) -> monotonic start
        self.replaced = 0

    def start(self) -> None:
        self._pool = self._new_pool()
        self._watchdog.start()

    def stop(self) -> None:
        """Take no more jobs and stop the watchdog; running collectors are left to finish (or hang)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._watchdog.stop()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="collector")

    @property
    def busy(self) -> int:
        """Number of collectors still running (a hung one keeps counting)."""
        with self._lock:
            return len(self._active)

    def stuck(self) -> int:
        """Collectors still running past their timeout (hung, e.g. on a dead network mount)."""
        limit = time.monotonic() - self.timeout_s
        with self._lock:
            return sum(1 for started in self._active.values() if started < limit)

    def submit(self, job: Job, collector: Collector) -> None:
        pool = self._pool
        if pool is None:
            raise RuntimeError("agent not started")
        if self.stuck() >= self.workers and self.replaced < MAX_POOL_REPLACEMENTS:
            # Python cannot kill a thread: leave the hung ones behind and carry on with new workers
            self.replaced += 1
            log.warning("all %d collector workers are stuck past their timeout; starting new ones (%d/%d)",
                        self.workers, self.replaced, MAX_POOL_REPLACEMENTS)
            pool.shutdown(wait=False)
            self._pool = pool = self._new_pool()
        try:
            pool.submit(self._collect, job, collector)
        except RuntimeError as exc:  # the pool was shut down: the agent is stopping
            job.claim()  # so the watchdog does not answer it either
            self._drop(job.reply_to, str(exc))
            return
        self._watchdog.watch(job)

    def _collect(self, job: Job, collector: Collector) -> None:
        if job.answered:  # it timed out while waiting for a worker
            return
        key = id(job)
        with self._lock:
            self._active[key] = time.monotonic()
        try:
            if not self._answer(job, collect(job, collector, self.agent_id)):
                log.debug("%s request %s finished after its timeout; result discarded", job.req.type, job.req.id)
        finally:
            with self._lock:
                self._active.pop(key, None)

    def _on_timeout(self, job: Job) -> None:
        self._answer(job, timed_out(job, self.agent_id, self.timeout_s))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000.0, 3)


__all__ = ["MAX_POOL_REPLACEMENTS", "Dispatcher", "Watchdog", "collect", "timed_out"]
