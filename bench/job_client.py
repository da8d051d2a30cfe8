"""One job as `fleetctl request --all` runs it (fleet_common.jobrun), in a process of its own so
that its memory is the job's: prints one JSON line of figures.

    .venv/bin/python bench/job_client.py --config X.yaml [--type ping] [--timeout 10]

Times are the event loop's clock: `connect_s` to the CONNACK, `fleet_read_s` reading the retained
statuses and choosing the targets, `send_s` from the first request out to the broker's last
acknowledgement, `last_answer_after_first_send_s`, `after_last_answer_s` from the last answer to
the end of the wait, and `total_s` from creating the client to the end. RSS is read before
connecting and at the end (its growth is the job's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import psutil

from fleet_common import compat
from fleet_common.config import load_config
from fleet_common.jobrun import JobRun
from fleet_common.jobs import JobSpec


async def one(args: argparse.Namespace) -> dict[str, object]:
    cfg = load_config(args.config)
    me = psutil.Process()
    rss0 = me.memory_info().rss
    loop = asyncio.get_running_loop()
    run = JobRun(cfg, JobSpec(type=args.type, timeout_s=args.timeout), client_name="bench")
    started = loop.time()
    result = await run.run()
    rss1 = me.memory_info().rss
    tally = result.tally
    return {"targeted": tally.targeted, "answered": tally.answered, "ok": tally.ok, "no_answer": tally.no_answer,
            "connect_s": round(run.connected - started, 3),
            "fleet_read_s": round(run.send_started - run.connected, 3),
            "send_s": round(run.send_done - run.send_started, 3),
            "last_answer_after_first_send_s": round(run.last_answer - run.send_started, 3) if run.last_answer else None,
            "after_last_answer_s": round(run.ended - run.last_answer, 3) if run.last_answer else None,
            "total_s": round(run.ended - started, 3), "peak_publish_per_s": round(run.peak_rate_per_s()),
            "receive_maximum": run.receive_maximum,
            "rss_before_mb": round(rss0 / 2**20, 1), "rss_after_mb": round(rss1 / 2**20, 1),
            "rss_growth_mb": round((rss1 - rss0) / 2**20, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--type", default="ping")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    compat.apply()
    t0 = time.monotonic()
    out = asyncio.run(one(args))
    out["process_s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
