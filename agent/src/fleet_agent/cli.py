"""`fleet-agent`: run the agent on this host, or print one collector's reading (--once)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fleet_common.cli import base_parser, load, run_main, stop_event
from fleet_common.errors import ConfigError, ContractError
from fleet_common.health import Heartbeat, add_check_argument, run_check
from fleet_common.topics import check_agent_id

from . import __version__, compat
from .collectors import REGISTRY, BadParams, jsonable

PROG = "fleet-agent"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(PROG, "Answer fleet telemetry requests over MQTT with readings of this host.")
    parser.add_argument("--id", metavar="AGENT_ID", default=None,
                        help="agent id (overrides agent.id; default: the sanitised host name)")
    parser.add_argument("--once", metavar="TYPE", default=None,
                        help=f"print one reading as JSON and exit; TYPE is one of {', '.join(sorted(REGISTRY))}")
    parser.add_argument("--params", metavar="JSON", default=None, help="params for --once, e.g. '{\"limit\": 5}'")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_check_argument(parser)
    return parser


def once(type_: str, params_text: str | None) -> int:
    collector = REGISTRY.get(type_)
    if collector is None:
        print(f"{PROG}: unknown type {type_!r}; known: {', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    try:
        params = json.loads(params_text) if params_text else {}
    except ValueError as exc:
        print(f"{PROG}: --params is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print(f"{PROG}: --params must be a JSON object", file=sys.stderr)
        return 2
    try:
        data = jsonable(collector(params))
    except BadParams as exc:
        print(f"{PROG}: bad params: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"{PROG}: {type_} collector failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    compat.apply()  # before paho is imported
    args = build_parser().parse_args(argv)
    cfg = load(args, PROG)
    if args.check:
        return run_check(cfg.agent.heartbeat.path, PROG)
    if args.once:
        return once(args.once, args.params)
    if args.id is not None:
        try:
            check_agent_id(args.id)
        except ContractError:
            raise ConfigError("--id", f"{args.id!r} must be 1-64 characters of [A-Za-z0-9_.-], "
                                      "not starting with '.'") from None
    from fleet_common import compat as paho_compat

    from .agent import Agent  # paho only when serving: --once and --help stay light
    paho_compat.apply()

    stop = stop_event()
    agent = Agent(cfg, agent_id=args.id)

    def problems() -> list[str]:
        return [] if agent.link.connected.is_set() else [f"not connected to the broker at {agent.link.where}"]

    with Heartbeat(cfg.agent.heartbeat.path, PROG, cfg.agent.heartbeat.interval_s,
                   lambda: {**agent.health(), "connected": agent.link.connected.is_set()}, problems):
        code = agent.run(stop)
    if agent.busy:
        # A hung collector thread would block interpreter exit (concurrent.futures joins its
        # workers at exit); the goodbye is already published, so leave now.
        logging.getLogger("fleet.agent").warning("%d collector(s) still running; exiting without them", agent.busy)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def entry() -> None:
    sys.exit(run_main(PROG, main))


if __name__ == "__main__":
    entry()
