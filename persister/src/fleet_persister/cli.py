"""`fleet-persister`: run the persister with the configured store."""

from __future__ import annotations

import sys
from typing import List, Optional

from fleet_common.cli import base_parser, load, run_main, stop_event

from .persister import Persister
from .stores import open_store

PROG = "fleet-persister"


def main(argv: Optional[List[str]] = None) -> int:
    parser = base_parser(PROG, "Validate and store every request, response and status; "
                               "acknowledge each message only after it is committed.")
    args = parser.parse_args(argv)
    cfg = load(args, PROG)
    stop = stop_event()
    store = open_store(cfg.persister)  # StoreError: one line saying what to check, exit 2
    return Persister(cfg, store).run(stop)


def entry() -> None:
    sys.exit(run_main(PROG, main))


if __name__ == "__main__":
    entry()
