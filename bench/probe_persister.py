"""`fleet-persister`, unchanged, plus a log of when each answer was committed.

The store records when an answer was collected, not when it was committed; the bench
needs the commit ("request-to-stored"). This wraps the configured store so that, right
after each batch commits, one line `<epoch_s> <request id>` per response in the batch is
appended to --commits (and `<epoch_s> =connected` on each connection). Everything else
is the real Persister and the real store.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from fleet_common import compat
from fleet_common.cli import base_parser, load, run_main, stop_event
from fleet_persister.persister import Persister
from fleet_store import Batch, RejectedRecord, StoreWriter, open_store

PROG = "probe-persister"


class RecordingStore:
    """A StoreWriter that logs the commit time of every response it writes."""

    def __init__(self, store: StoreWriter, out: IO[str]) -> None:
        self._store, self._out = store, out

    def write(self, batch: Batch) -> list[RejectedRecord]:
        turned_away = self._store.write(batch)
        now = f"{time.time():.4f} "
        self._out.write("".join(now + item.message.id + "\n" for item in batch.responses))
        self._out.flush()
        return turned_away

    def refuses(self, exc: BaseException) -> bool:
        return self._store.refuses(exc)

    def mark(self, what: str) -> None:
        self._out.write(f"{time.time():.4f} ={what}\n")
        self._out.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(PROG, __doc__ or "")
    parser.add_argument("--commits", required=True, metavar="PATH")
    args = parser.parse_args(argv)
    cfg = load(args, PROG)
    compat.apply()  # as fleet-persister's main() does
    stop = stop_event()
    with open(args.commits, "a", encoding="utf-8") as out:
        store = RecordingStore(open_store(cfg.persister), out)
        persister = Persister(cfg, store)
        persister.link.on_connect_hooks.append(lambda client, present: store.mark("connected"))
        return int(persister.run(stop))


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
