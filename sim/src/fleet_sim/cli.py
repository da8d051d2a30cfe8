"""`fleet-sim`: N simulated agents in one process, for load tests and sizing a deployment."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from fleet_common import compat
from fleet_common.cli import base_parser, load, run_main
from fleet_common.labels import parse_pairs

from . import __version__
from .fleet import Fleet, SimSettings
from .synthetic import DEFAULT_PROCESSES, TYPES

PROG = "fleet-sim"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(PROG, "Simulate N agents, each with its own MQTT connection, answering every request "
                               "with synthetic readings of realistic size.")
    parser.add_argument("--agents", type=int, default=10, metavar="N", help="agents to simulate (default 10)")
    parser.add_argument("--id-prefix", default="sim", help="agent ids are PREFIX-0001 ... (default 'sim')")
    parser.add_argument("--types", default=",".join(TYPES),
                        help=f"comma-separated types the agents advertise (default: all of {', '.join(TYPES)})")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES,
                        help=f"processes on each simulated host, listed in a processes answer (default "
                             f"{DEFAULT_PROCESSES}, about 40 KB)")
    parser.add_argument("--session-expiry-s", type=int, default=0,
                        help="MQTT session expiry; 0 (default) is a clean session, >0 a persistent one like the "
                             "real agent's")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label every agent advertises (repeatable)")
    parser.add_argument("--label-cycle", action="append", default=[], metavar="KEY=V1/V2/...",
                        help="a label whose value goes round the list by agent number, e.g. role=web/db (repeatable)")
    parser.add_argument("--keepalive-s", type=int, default=60)
    parser.add_argument("--connect-concurrency", type=int, default=100,
                        help="CONNECTs awaiting their CONNACK at once (default 100)")
    parser.add_argument("--stats-every-s", type=float, default=10.0, help="log a summary this often")
    parser.add_argument("--stats-file", default=None, metavar="PATH",
                        help="also write the counters as JSON here at each summary and at exit")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


async def serve(fleet_args: argparse.Namespace, mqtt_cfg: object) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = SimSettings(agents=fleet_args.agents, id_prefix=fleet_args.id_prefix,
                           types=tuple(t for t in fleet_args.types.split(",") if t),
                           processes=fleet_args.processes, session_expiry_s=fleet_args.session_expiry_s,
                           keepalive_s=fleet_args.keepalive_s, connect_concurrency=fleet_args.connect_concurrency,
                           stats_every_s=fleet_args.stats_every_s, stats_file=fleet_args.stats_file,
                           labels=tuple(parse_pairs(",".join(fleet_args.label)).items()),
                           label_cycle=tuple((k, tuple(v.split("/"))) for k, v in
                                             parse_pairs(",".join(fleet_args.label_cycle)).items()))
    fleet = Fleet(mqtt_cfg, settings)  # type: ignore[arg-type]
    await fleet.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load(args, PROG)
    compat.apply()
    return asyncio.run(serve(args, cfg.mqtt))


def entry() -> None:
    sys.exit(run_main(PROG, main))


if __name__ == "__main__":
    entry()
