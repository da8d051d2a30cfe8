"""Command-line plumbing shared by the fleet commands: --config, --log-level, --log-format,
config errors printed as one plain line, and signals turned into a stop event."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable, List, Optional

from .config import Config, load_config
from .errors import FleetError
from .logs import setup_logging


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="configuration file (default: ./config.yaml if present)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    parser.add_argument("--log-format", choices=["text", "json"], default=None)
    return parser


def load(args: argparse.Namespace, prog: str) -> Config:
    cfg = load_config(args.config)
    level = args.log_level or cfg.log.level
    fmt = args.log_format or cfg.log.format
    setup_logging(level, fmt, prog)
    return cfg


def stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so services drain and exit instead of dying mid-write."""
    event = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        event.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return event


def run_main(prog: str, main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run `main`, turning project errors into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except FleetError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
