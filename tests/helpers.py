"""Small helpers for reading what the persister stored, straight from the SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import psutil

# `make test-fast` sets FLEET_TEST_FAST: property tests then try a quarter of their examples
# (at least 10), so that the quick run stays under a minute; `make test` tries them all.
FAST = bool(os.environ.get("FLEET_TEST_FAST"))


def examples(n: int) -> int:
    """How many examples a property test tries: `n`, or a quarter of it in `make test-fast`."""
    return max(10, n // 4) if FAST else n


def rows(db: Path, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run a read query on the SQLite store; an absent or half-created file reads as empty."""
    if not Path(db).exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def parse_workers_of(pid: int) -> list[psutil.Process]:
    """A persister's parse worker processes (spawn also starts a resource tracker, which parses nothing)."""
    return [p for p in psutil.Process(pid).children() if "resource_tracker" not in " ".join(p.cmdline())]


def running(proc: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie waiting to be reaped."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
