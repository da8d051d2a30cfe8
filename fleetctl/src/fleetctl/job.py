"""`fleetctl request --all|--label ... TYPE` (one job to every matching agent, with a live tally)
and `fleetctl job JOB_ID` (that job's tally later, from the store). The job itself is
fleet_common.jobs and fleet_common.jobrun, which the dashboard's "ask now" uses too."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from fleet_common.config import Config
from fleet_common.errors import FleetError
from fleet_common.jobrun import JobRun, NoTargets
from fleet_common.jobs import ERROR, NO_ANSWER, OK, Candidate, JobResult, JobSpec, Tally, check_job_id
from fleet_common.labels import Labels, select
from fleet_store import StoreError, describe, open_reader
from fleet_store.jobs import known_agents, stored_job

from .views import fmt_ms, summarise, table

SHOWN_AS = {OK: "ok", ERROR: "error", NO_ANSWER: "no answer"}


class LiveTally:
    """The tally on one line of a terminal, rewritten in place; nothing on anything else (a pipe,
    a file, a CI log) but the final table."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.shown = out, False

    def __call__(self, tally: Tally) -> None:
        self.out.write(f"\r{tally.line()}\x1b[K")
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()


def label_selector(pairs: list[str]) -> Labels:
    """`--label k=v` values as one selector; a bad one stops the command with one line (exit 2)."""
    try:
        return select(pairs)
    except ValueError as exc:
        raise FleetError(f"--label: {exc}") from None


def spec_of(args: Any) -> JobSpec:
    """The job the command line asks for: --all, or --label pairs (all must match)."""
    if args.all and args.label:
        raise FleetError("give --all or --label, not both")
    selector = label_selector(args.label) if args.label else None
    from .request import parse_params

    return JobSpec(type=args.agent, params=parse_params(args.param), selector=selector,
                   expires_s=args.expires if args.expires is not None else JobSpec.expires_s,
                   timeout_s=args.timeout)


def stored_agents(cfg: Config) -> tuple[list[Candidate], str | None]:
    """The store's agents, for the labels of those now offline (a Last Will carries none), and why
    there are none when the store cannot be read."""
    try:
        store = open_reader(cfg.persister)
    except StoreError as exc:
        return [], str(exc)
    try:
        return known_agents(store.agents()), None
    finally:
        store.close()


def run(cfg: Config, args: Any) -> int:
    """Send the job, wait, print its results; 0 when every targeted agent answered ok, else 1."""
    spec = spec_of(args)
    known, unreadable = stored_agents(cfg)
    if unreadable and spec.selector:
        print(f"fleetctl: offline agents' labels are unknown, so --label matches online agents only: {unreadable}",
              file=sys.stderr)
    live = LiveTally(sys.stderr) if sys.stderr.isatty() else None
    job = JobRun(cfg, spec, on_tally=live)
    try:
        result = asyncio.run(job.run(known))
    except NoTargets as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was sent stays sent; the store has the rest
        if live is not None:
            live.close()
            live = None
        print(f"fleetctl: stopped waiting: {Tally.of(job.results.values()).line()}; 'fleetctl job {job.job}' "
              "shows the answers the store receives", file=sys.stderr)
        return 130
    finally:
        if live is not None:
            live.close()
    print(render(result, args.json))
    print(f"job {result.job}: {result.tally.line()}; 'fleetctl job {result.job}' shows later answers",
          file=sys.stderr)
    if result.tally.no_answer and not result.tally.answered:
        print(f"fleetctl: no agent answered; if they are up, check that user {cfg.mqtt.username!r} may read "
              f"{cfg.mqtt.topics().all_responses()} (the operator role may; the broker drops what a user may not "
              "read without a word)", file=sys.stderr)
    return 0 if result.all_ok else 1


def show(cfg: Config, job_id: str, as_json: bool) -> int:
    """A job's tally from the store, late answers included; exit code as for the job itself."""
    check_job_id(job_id)
    store = open_reader(cfg.persister)
    try:
        result = stored_job(job_id, store.job_requests(job_id), store.agents())
    finally:
        store.close()
    if result is None:
        raise FleetError(f"no request of job {job_id} is in the store ({describe(cfg.persister)}); the persister "
                         "stores a job's requests as they are sent, so check the id and that it was running")
    print(render(result, as_json))
    if not as_json:
        print(f"\n{result.tally.line()}")
    return 0 if result.all_ok else 1


def render(result: JobResult, as_json: bool) -> str:
    """The `--json` object, or a table: one row per agent, its status, latency and a short summary."""
    if as_json:
        return json.dumps(result.to_dict(), indent=2)
    rows = [[r.agent_id, SHOWN_AS.get(r.status, r.status), fmt_ms(r.latency_ms), outline(result.type, r.data, r.error)]
            for r in sorted(result.results, key=lambda r: r.agent_id)]
    return table(["AGENT", "STATUS", "LATENCY", "RESULT"], rows)


def outline(type_: str, data: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    """The data in a few words, or the error's code and message."""
    if error:
        return f"{error.get('code')}: {str(error.get('message') or '')[:100]}"
    if data is None:
        return ""
    return summarise(type_, data) or "{}"
