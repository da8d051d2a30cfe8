"""`fleet-persister`: run the persister with the configured store; `--check` reports its health."""

from __future__ import annotations

import logging
import sys

from fleet_common import compat
from fleet_common.cli import base_parser, load, run_main, stop_event
from fleet_common.health import Heartbeat, add_check_argument, run_check
from fleet_common.metrics import serve_metrics
from fleet_store import open_store_waiting

from .metrics import MeasuredStore, problems, register, snapshot
from .persister import Persister

PROG = "fleet-persister"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(PROG, "Validate and store every request, response and status; "
                               "acknowledge each message only after it is committed.")
    add_check_argument(parser)
    args = parser.parse_args(argv)
    cfg = load(args, PROG)
    if args.check:
        return run_check(cfg.persister.heartbeat.path, PROG)
    compat.apply()
    stop = stop_event()
    # unreachable server: retried with backoff; StoreError (bad path, URI, credentials): one line, exit 2
    opened = open_store_waiting(cfg.persister, stop)
    if opened is None:
        logging.getLogger("fleet.persister").info("stopped before the store was reachable")
        return 0
    store = MeasuredStore(opened)
    persister = Persister(cfg, store)
    metrics = serve_metrics("persister", cfg.persister, register(persister, store))
    try:
        with Heartbeat(cfg.persister.heartbeat.path, PROG, cfg.persister.heartbeat.interval_s,
                       lambda: snapshot(persister), lambda: problems(persister, store), persister.ready):
            return persister.run(stop)
    finally:
        metrics.stop()


def entry() -> None:
    sys.exit(run_main(PROG, main))


if __name__ == "__main__":
    entry()
