"""`fleet-controller`: run the scheduler until SIGTERM or SIGINT, reloading its schedule on SIGHUP;
`--check` reports its health."""

from __future__ import annotations

import logging
import signal
import sys

from fleet_common import compat
from fleet_common.cli import base_parser, load, run_main, stop_event
from fleet_common.health import Heartbeat, add_check_argument, run_check
from fleet_common.metrics import serve_metrics

from .controller import Controller
from .metrics import registry_for, snapshot
from .reload import reload

PROG = "fleet-controller"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(PROG, "Ask every agent for each request type on a spread schedule; "
                               "SIGHUP rereads controller.schedule and controller.groups.")
    add_check_argument(parser)
    args = parser.parse_args(argv)
    cfg = load(args, PROG)
    if args.check:
        return run_check(cfg.controller.heartbeat.path, PROG)
    compat.apply()
    # APScheduler logs every run of the tick at info; a tick runs twice a second.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    controller = Controller(cfg)
    stop = stop_event({signal.SIGHUP: lambda: reload(controller, args.config)})
    metrics = serve_metrics("controller", cfg.controller, registry_for(controller))
    heartbeat = Heartbeat(cfg.controller.heartbeat.path, PROG, cfg.controller.heartbeat.interval_s,
                          lambda: snapshot(controller),
                          lambda: [] if controller.link.connected.is_set()
                          else [f"not connected to the broker at {controller.link.where}"], controller.ready)
    controller.start()
    heartbeat.start()
    while not stop.wait(1.0):
        pass
    heartbeat.stop()
    controller.stop()
    metrics.stop()
    return 0


def entry() -> None:
    sys.exit(run_main(PROG, main))
