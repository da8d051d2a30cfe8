"""The agent's durable outbox: every response is written here before it is published and
deleted when the broker acknowledges it (PUBACK), so a response survives a lost link and
a killed agent. Bounded: when full, the oldest entries are dropped and counted.

One SQLite file (stdlib only), WAL with synchronous=NORMAL: a committed entry survives the
agent being killed; an operating-system crash can lose the last few commits.

A file that is not a readable SQLite outbox (corrupt, truncated, something else) is moved
aside to `<path>.corrupt-<unix time>` and a fresh outbox is started: it holds only answers
not yet delivered, and a host that stops being monitored over a damaged file costs more than
those answers. A path that cannot be used at all (no permission, a file where the folder
should be) raises OutboxError naming `agent.outbox_path`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

from fleet_common.errors import FleetError

log = logging.getLogger("fleet.agent.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    correlation BLOB
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

Entry = tuple[int, str, bytes, Optional[bytes]]  # seq, topic, payload, correlation


class OutboxError(FleetError):
    """The outbox file cannot be created or opened; the message says what to check."""


class Outbox:
    """Outbox(path, max_messages): put() returns the entry's sequence number; delete() on PUBACK."""

    def __init__(self, path: str, max_messages: int) -> None:
        self.max_messages = max(1, int(max_messages))
        self._lock = threading.Lock()
        if path != ":memory:":
            file = Path(path).expanduser()
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutboxError(f"cannot create the folder of the outbox {path!r} ({exc}); check that "
                                  "agent.outbox_path names a file in a folder this user can write") from None
            path = str(file)
        self.path = path
        self.recovered_from: str | None = None  # where a corrupt file was moved to, if one was
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            if path == ":memory:" or not _corrupt(exc):
                raise OutboxError(f"cannot open the outbox {path!r} ({exc}); check that agent.outbox_path "
                                  "names a file this user can read and write") from None
            self.recovered_from = self._move_aside(path, exc)
            self._db = self._open(path)
        self.queued = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        try:
            # read-only checks first, so a file that is not ours is left as it was
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "outbox" in tables:
                db.execute("SELECT seq, topic, payload, correlation FROM outbox LIMIT 1").fetchall()
            if "counters" in tables:
                db.execute("SELECT name, value FROM counters LIMIT 1").fetchall()
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _move_aside(path: str, exc: Exception) -> str:
        aside = f"{path}.corrupt-{int(time.time())}"
        try:
            Path(path).rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(path + suffix).unlink(missing_ok=True)
        except OSError as move_exc:
            raise OutboxError(f"the outbox {path!r} is unreadable ({exc}) and cannot be moved aside "
                              f"({move_exc}); move or delete it, or point agent.outbox_path elsewhere") from None
        log.error("the outbox %s was unreadable (%s): moved it to %s and started an empty one; answers "
                  "waiting in it are lost", path, exc, aside)
        return aside

    def put(self, topic: str, payload: bytes, correlation: bytes | None) -> int:
        """Store one response durably; drop the oldest entries beyond max_messages."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = db.execute("INSERT INTO outbox (topic, payload, correlation) VALUES (?, ?, ?)",
                                 (topic, payload, correlation)).lastrowid
                over = self.queued + 1 - self.max_messages
                if over > 0:
                    db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                               (over,))
                    db.execute("INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                               "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", (over,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.queued += 1 - max(over, 0)
            if over > 0:
                self.dropped += over
                if self.dropped == over or self.dropped % 1000 < over:
                    log.warning("outbox full (%d responses): dropped the oldest; %d dropped so far",
                                self.max_messages, self.dropped)
            assert seq is not None
            return int(seq)

    def delete(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for i in range(0, len(seqs), 500):
                    chunk = seqs[i:i + 500]
                    removed += db.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})",
                                          chunk).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.queued -= removed

    def entries(self, after: int = 0, limit: int = 500) -> list[Entry]:
        """Entries in order, from sequence number `after` (exclusive)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, correlation FROM outbox WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [(int(s), str(t), bytes(p), None if c is None else bytes(c)) for s, t, p, c in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"queued": self.queued, "dropped": self.dropped}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _corrupt(exc: sqlite3.Error) -> bool:
    """An error that says the file's content is damaged, not that it cannot be reached."""
    text = str(exc).lower()
    return any(word in text for word in ("malformed", "not a database", "no such table", "no such column",
                                         "corrupt"))


__all__ = ["Outbox", "OutboxError"]
