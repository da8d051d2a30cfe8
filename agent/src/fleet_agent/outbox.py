"""The agent's durable outbox: every response is written here before it is published and
deleted when the broker acknowledges it (PUBACK), so a response survives a lost link and
a killed agent. Bounded: when full, the oldest entries are dropped and counted.

One SQLite file (stdlib only), WAL with synchronous=NORMAL: a committed entry survives the
agent being killed; an operating-system crash can lose the last few commits.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import List, Optional, Tuple

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

Entry = Tuple[int, str, bytes, Optional[bytes]]  # seq, topic, payload, correlation


class Outbox:
    """Outbox(path, max_messages): put() returns the entry's sequence number; delete() on PUBACK."""

    def __init__(self, path: str, max_messages: int) -> None:
        self.max_messages = max(1, int(max_messages))
        self._lock = threading.Lock()
        if path != ":memory:":
            file = Path(path).expanduser()
            file.parent.mkdir(parents=True, exist_ok=True)
            path = str(file)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        self.queued = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0

    def put(self, topic: str, payload: bytes, correlation: Optional[bytes]) -> int:
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

    def delete(self, seqs: List[int]) -> None:
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

    def entries(self, after: int = 0, limit: int = 500) -> List[Entry]:
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


__all__ = ["Outbox"]
