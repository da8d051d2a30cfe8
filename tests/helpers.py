"""Small helpers for reading what the persister stored, straight from the SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Dict, List

import psutil


def rows(db: Path, sql: str, *args: Any) -> List[Dict[str, Any]]:
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


def parse_workers_of(pid: int) -> List[psutil.Process]:
    """A persister's parse worker processes (spawn also starts a resource tracker, which parses nothing)."""
    return [p for p in psutil.Process(pid).children() if "resource_tracker" not in " ".join(p.cmdline())]


def running(proc: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie waiting to be reaped."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
