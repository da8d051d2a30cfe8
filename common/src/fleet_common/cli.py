"""Command-line plumbing shared by the fleet commands: --config, --log-level, --log-format,
config errors printed as one plain line, and signals turned into a stop event."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Callable

from .config import Config, load_config
from .errors import FleetError
from .logs import setup_logging


def add_global_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """--config, --log-level and --log-format on `parser`."""
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="configuration file (default: ./config.yaml if present)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default)
    parser.add_argument("--log-format", choices=["text", "json"], default=default)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_global_options(parser)
    return parser


def globals_after_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Let every subcommand take the global options too, so `fleetctl status --config X` works as
    `fleetctl --config X status` does. SUPPRESS as their default: a subcommand that is not given
    one leaves what the main parser read in place."""
    for sub in set(subparsers.choices.values()):
        add_global_options(sub, default=argparse.SUPPRESS)


def load(args: argparse.Namespace, prog: str, level: str | None = None) -> Config:
    """The config of --config; logging set up at --log-level, else `level`, else log.level."""
    cfg = load_config(args.config)
    level = args.log_level or level or cfg.log.level
    fmt = args.log_format or cfg.log.format
    setup_logging(level, fmt, prog)
    return cfg


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_event(handlers: Mapping[int, Callable[[], object]] | None = None) -> threading.Event:
    """An event set by SIGINT or SIGTERM, so services drain and exit instead of dying mid-write.
    Call it once per process, from the main thread. `handlers` run for other signals (SIGHUP:
    reload), one at a time, in the same thread that sets the event; one that fails is logged.

    The event is set by a thread of its own, woken through signal.set_wakeup_fd: a Python signal
    handler runs in the main thread between two bytecodes, and if those are inside the event's
    own wait() (which holds its lock for a moment) event.set() there waits for that lock forever.
    A load generator calling wait() 200 times a second hung that way under SIGTERM."""
    event = threading.Event()
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    handlers = dict(handlers or {})
    for signum in (*STOP_SIGNALS, *handlers):
        signal.signal(signum, lambda _signum, _frame: None)  # the C handler writes signum to `send`

    def watch() -> None:
        with receive, send:  # open for the life of the process: the wakeup fd must stay valid
            while data := receive.recv(64):
                if any(signum in STOP_SIGNALS for signum in data):
                    event.set()
                for signum in dict.fromkeys(s for s in data if s in handlers):  # repeats coalesce
                    try:
                        handlers[signum]()
                    except Exception as exc:  # the thread must live on: it is what stops the process
                        logging.getLogger("fleet").error("handling signal %s failed: %s",
                                                         signal.Signals(signum).name, exc)

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    return event


def run_main(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main`, turning project errors into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except FleetError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
