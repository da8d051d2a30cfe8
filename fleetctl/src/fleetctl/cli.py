"""fleetctl: up, status, request (one agent, or a job to many), job, history, dashboard, and
provisioning of the production broker (make-certs, add-agent, remove-agent, add-user, remove-user,
list-users)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from typing import Callable

from fleet_common import compat
from fleet_common.ask import ask
from fleet_common.cli import base_parser, globals_after_subcommands, load, run_main, stop_event
from fleet_common.config import Config
from fleet_common.errors import FleetError
from fleet_store import open_reader

from . import job, up, views
from . import request as req
from .provision import add_provision_parsers, run_provision

# Commands other distributions add to fleetctl (the dashboard's `dashboard`), found by name at run
# time, so fleetctl does not import, or depend on, what it offers to run.
COMMANDS = "fleetctl.commands"
Command = Callable[[Config, argparse.Namespace], int]
SERVICE_COMMANDS = ("up", "dashboard")
INSTALL_DASHBOARD = "install it with 'pip install ./dashboard' (or 'make run', which installs every part)"


def installed_command(name: str) -> Command | None:
    """The command `name` an installed distribution declares in the `fleetctl.commands` entry
    points, or None if none does; ImportError if it is declared but cannot be imported."""
    for found in metadata.entry_points(group=COMMANDS, name=name):
        command: Command = found.load()
        return command
    return None


def read_from(cfg: Config, as_json: bool) -> None:
    """Name the store a reader read: the table's last line, or on stderr beside JSON for scripts."""
    if as_json:
        print(f"fleetctl: read {views.footer(cfg)}", file=sys.stderr)
    else:
        print(views.footer(cfg))


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = base_parser("fleetctl", "Run and query the fleet telemetry system.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", help="run the whole stack on this machine (Ctrl-C stops it)")
    s.add_argument("--broker-config", metavar="PATH", help="Mosquitto config to start (default broker_config/dev.conf)")
    s.add_argument("--data-dir", default="data", help="where the embedded broker keeps its files (default: data)")

    s = sub.add_parser("status", help="agents: online, last seen, answered/issued, median latency")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    s.add_argument("--since", type=float, default=3600, metavar="SECONDS",
                   help="count requests of this recent window (default 3600)")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until Ctrl-C; with --json, one JSON line each")
    s.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="only agents with this label (repeatable: all must match)")

    s = sub.add_parser("request", help="ask an agent, or every (matching) agent, now; wait; print the answers",
                       usage="fleetctl request [options] AGENT TYPE | --all TYPE | --label KEY=VALUE [--label ...] "
                             "TYPE")
    s.add_argument("agent", metavar="AGENT", help="the agent to ask (with --all or --label: the type)")
    s.add_argument("type", metavar="TYPE", nargs="?", help="the request type: cpu, memory, disk, ...")
    s.add_argument("--all", action="store_true", help="one job to every known agent")
    s.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="one job to the agents with this label (repeatable: all must match)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="request parameter (repeatable)")
    s.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="wait this long for the answer (of each online agent, in a job); one agent's request "
                        "expires at the broker then (default 10)")
    s.add_argument("--expires", type=positive_seconds, default=None, metavar="SECONDS",
                   help="a job's requests wait at the broker this long for offline agents (default 3600)")
    s.add_argument("--json", action="store_true", help="a job's results as one JSON object, for scripts")

    s = sub.add_parser("job", help="a job's tally from the store, answers that came after it stopped waiting included")
    s.add_argument("job", metavar="JOB_ID", help="the id 'fleetctl request --all|--label' printed")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")

    s = sub.add_parser("history", help="stored results of one agent and type, newest first")
    s.add_argument("agent")
    s.add_argument("type")
    s.add_argument("--limit", type=positive_int, default=20, help="newest N results (default 20)")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")

    s = sub.add_parser("dashboard", help="serve the read-only web dashboard (needs fleet-dashboard installed)")
    s.add_argument("--host", default=None, help="address to listen on (default dashboard.host)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default dashboard.port)")

    add_provision_parsers(sub)
    globals_after_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # a command that answers and exits is quiet (warnings and errors only) unless --log-level says
    # otherwise; `up` and `dashboard` run services, which log at the configured level
    cfg = load(args, "fleetctl", None if args.command in SERVICE_COMMANDS else "warning")
    compat.apply()
    if args.command == "up":
        extra = [f"--log-level={args.log_level}"] if args.log_level else []
        extra += [f"--log-format={args.log_format}"] if args.log_format else []
        return up.run_stack(cfg, args.config, stop_event(), broker_config=args.broker_config,
                            data_dir=args.data_dir, extra_args=extra)
    selector = job.label_selector(args.label) if args.command == "status" else {}
    if args.command == "status" and args.watch is not None:
        views.watch(lambda: views.status_frame(cfg, args.since, args.json, selector), max(args.watch, 0.1),
                    stop_event())
        return 0
    if args.command == "status":
        print(views.render_status(views.status_rows(cfg, args.since, selector), args.json, selector))
        read_from(cfg, args.json)
        for line in views.broker_warnings(cfg):
            print(line, file=sys.stderr)
        return 0
    if args.command == "request" and (args.all or args.label):
        if args.type is not None:
            raise FleetError(f"with --all or --label give only the type, as in 'fleetctl request --all {args.type}'")
        return job.run(cfg, args)
    if args.command == "job":
        return job.show(cfg, args.job, args.json)
    if args.command == "request":
        if args.type is None:
            raise FleetError("give an agent and a type ('fleetctl request web-01 cpu'), or --all or --label and a "
                             "type ('fleetctl request --label role=web cpu')")
        if args.expires is not None:
            raise FleetError("--expires is for jobs (--all, --label); one agent's request expires after --timeout")
        started = time.monotonic()
        res = ask(cfg, args.agent, args.type, req.parse_params(args.param), args.timeout,
                  notice=lambda text: print(f"fleetctl: {text}", file=sys.stderr, flush=True))
        print(json.dumps(res.to_dict(), indent=2))
        print(f"answered in {(time.monotonic() - started) * 1000:.0f} ms", file=sys.stderr)
        return 0 if res.status == "ok" else 1
    if args.command == "history":
        store = open_reader(cfg.persister)
        try:
            known = views.known_types(store, args.agent)
            if args.type not in known:
                raise FleetError(f"unknown type {args.type!r}; known types: {', '.join(sorted(known))}")
            records = store.history(args.agent, args.type, limit=args.limit)
        finally:
            store.close()
        print(views.render_history(records, args.json))
        read_from(cfg, args.json)
        return 0
    if args.command == "dashboard":
        try:
            dashboard = installed_command("dashboard")
        except ImportError as exc:
            raise FleetError(f"the dashboard is not installed ({exc.name} is missing); {INSTALL_DASHBOARD}") from None
        if dashboard is None:
            raise FleetError(f"the dashboard is not installed; {INSTALL_DASHBOARD}")
        return dashboard(cfg, args)
    done = run_provision(args, cfg)
    if done is not None:
        return done
    raise FleetError(f"unknown command {args.command}")


def entry() -> None:
    sys.exit(run_main("fleetctl", main))
