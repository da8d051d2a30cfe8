"""`fleet-controller`: run the scheduler until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from fleet_common.cli import base_parser, load, run_main, stop_event

from .controller import Controller

PROG = "fleet-controller"


def main(argv: Optional[List[str]] = None) -> int:
    parser = base_parser(PROG, "Ask every agent for each request type on a spread schedule.")
    args = parser.parse_args(argv)
    cfg = load(args, PROG)
    # APScheduler logs every run of the tick at info; a tick runs twice a second.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    stop = stop_event()
    controller = Controller(cfg).start()
    while not stop.wait(1.0):
        pass
    controller.stop()
    return 0


def entry() -> None:
    sys.exit(run_main(PROG, main))
