"""SQLite store: the embedded default. One column per contract field (nested values as JSON
text, timestamps as RFC 3339 text), WAL so readers (fleetctl, dashboards) never block the
writer, and one transaction per batch."""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from fleet_common import iso
from fleet_common.backoff import Backoff

from .base import (
    DATA_ERRORS,
    DEFAULT_RETENTION_S,
    DEFAULT_TREND_RETENTION_S,
    EXPIRED_ERROR,
    AgentRecord,
    Batch,
    EncodedJSON,
    LatestRecord,
    Owner,
    RejectedRecord,
    RequestRecord,
    Resolved,
    Stats,
    StoreError,
    StoreMissing,
    answer_time,
    birth_labels,
    check_fields,
    displaced_letter,
    latency_ms,
    newest_per_key,
    norm_ts,
    resolve,
    response_state,
    retention_until,
    seen_at,
    summarise_counts,
)
from .trends import TREND_TYPES, Answer, TrendRecord, roll_up

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id           TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    params       TEXT,
    issued_at    TEXT,
    expires_at   TEXT,
    state        TEXT NOT NULL DEFAULT 'pending',
    answered_at  TEXT,
    latency_ms   REAL,
    data         TEXT,
    error        TEXT,
    expire_at    TEXT,
    collected_at TEXT,
    received_at  TEXT,
    job          TEXT
);
CREATE INDEX IF NOT EXISTS requests_history ON requests (agent_id, type, COALESCE(issued_at, answered_at));
CREATE INDEX IF NOT EXISTS requests_time ON requests (COALESCE(issued_at, answered_at));
CREATE INDEX IF NOT EXISTS requests_pending ON requests (expires_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_expire_at ON requests (expire_at);
CREATE TABLE IF NOT EXISTS agents (
    agent_id      TEXT PRIMARY KEY,
    online        INTEGER,
    first_seen    TEXT NOT NULL,
    last_seen     TEXT NOT NULL,
    hostname      TEXT,
    platform      TEXT,
    agent_version TEXT,
    types         TEXT,
    status_at     TEXT,
    labels        TEXT
);
CREATE TABLE IF NOT EXISTS rejected (
    id          TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rejected_received_at ON rejected (received_at);
CREATE TABLE IF NOT EXISTS trends (
    agent_id  TEXT NOT NULL,
    series    TEXT NOT NULL,
    key       TEXT NOT NULL DEFAULT '',
    hour      TEXT NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    avg       REAL GENERATED ALWAYS AS (sum / count) VIRTUAL,
    expire_at TEXT NOT NULL,
    PRIMARY KEY (agent_id, series, key, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trends_expire_at ON trends (expire_at);
"""
# The newest ok answer per agent and type (what the fleet page and /metrics show), kept beside
# requests in the same transaction. Created by _add_latest, which backfills it once from requests.
LATEST_SCHEMA = """
CREATE TABLE latest (
    agent_id    TEXT NOT NULL,
    type        TEXT NOT NULL,
    id          TEXT NOT NULL,
    answered_at TEXT NOT NULL,
    data        TEXT,
    PRIMARY KEY (agent_id, type)
);
CREATE INDEX latest_type ON latest (type, answered_at);
"""
# Columns added since the first release: a database made before gets them when it is opened.
ADDED_COLUMNS = {"requests": ("collected_at TEXT", "received_at TEXT", "job TEXT"),
                 "rejected": ("detail TEXT NOT NULL DEFAULT ''",),
                 "agents": ("labels TEXT",)}
# Indexes on added columns, made once the columns are there (SCHEMA runs before _add_columns).
# Partial: the controller's requests (no job) cost the index nothing.
ADDED_INDEXES = ("CREATE INDEX IF NOT EXISTS requests_job ON requests (job) WHERE job IS NOT NULL",)

# The request decides whose a record is (base.resolve); these conditions make sure of it
# in SQL too: an upsert never changes a record of another agent or type.
UPSERT_REQUEST = """
INSERT INTO requests (id, agent_id, type, params, issued_at, expires_at, state, expire_at, job)
VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)
ON CONFLICT (id) DO UPDATE SET
    params = COALESCE(requests.params, excluded.params),
    job = CASE WHEN requests.issued_at IS NULL THEN excluded.job ELSE requests.job END,
    issued_at = COALESCE(requests.issued_at, excluded.issued_at),
    expires_at = COALESCE(requests.expires_at, excluded.expires_at),
    expire_at = COALESCE(requests.expire_at, excluded.expire_at)
WHERE requests.agent_id = excluded.agent_id AND requests.type = excluded.type
"""

UPSERT_RESPONSE = """
INSERT INTO requests (id, agent_id, type, state, answered_at, data, error, expire_at, collected_at, received_at,
                      latency_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, answered_at = excluded.answered_at, data = excluded.data,
    error = excluded.error, expire_at = excluded.expire_at, collected_at = excluded.collected_at,
    received_at = excluded.received_at, latency_ms = excluded.latency_ms
WHERE requests.agent_id = excluded.agent_id AND requests.type = excluded.type
"""

SEEN_AGENT = """
INSERT INTO agents (agent_id, first_seen, last_seen) VALUES (?, ?, ?)
ON CONFLICT (agent_id) DO UPDATE SET last_seen = MAX(agents.last_seen, excluded.last_seen)
"""

APPLY_STATUS = """
UPDATE agents SET online = ?, hostname = COALESCE(?, hostname), platform = COALESCE(?, platform),
    agent_version = COALESCE(?, agent_version), types = COALESCE(?, types), labels = COALESCE(?, labels),
    status_at = ?
WHERE agent_id = ? AND (status_at IS NULL OR status_at <= ?)
"""

# Never backwards: a row is replaced only by a newer answer, by answered_at and then id, so an
# older answer arriving late (an outbox drained after an outage, a redelivery) leaves it.
UPSERT_LATEST = """
INSERT INTO latest (agent_id, type, id, answered_at, data) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (agent_id, type) DO UPDATE SET id = excluded.id, answered_at = excluded.answered_at, data = excluded.data
WHERE (excluded.answered_at, excluded.id) > (latest.answered_at, latest.id)
"""
# The same, from a stored ok record (an answer whose answered_at its late request moved); `WHERE`
# also parts the SELECT from ON CONFLICT, as SQLite's grammar needs.
LATEST_FROM_REQUESTS = """
INSERT INTO latest (agent_id, type, id, answered_at, data)
SELECT agent_id, type, id, answered_at, data FROM requests WHERE {where}
ON CONFLICT (agent_id, type) DO UPDATE SET id = excluded.id, answered_at = excluded.answered_at, data = excluded.data
WHERE (excluded.answered_at, excluded.id) > (latest.answered_at, latest.id)
"""

INSERT_REJECTED = ("INSERT OR IGNORE INTO rejected (id, received_at, topic, reason, payload, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?)")

# An hour's samples added to what is stored (trends.TrendRow); the same hour written again adds to it.
UPSERT_TREND = """
INSERT INTO trends (agent_id, series, key, hour, count, sum, min, max, expire_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (agent_id, series, key, hour) DO UPDATE SET
    count = trends.count + excluded.count, sum = trends.sum + excluded.sum,
    min = MIN(trends.min, excluded.min), max = MAX(trends.max, excluded.max),
    expire_at = MAX(trends.expire_at, excluded.expire_at)
"""
NEWEST_NETWORK = ("SELECT answered_at, data, received_at FROM requests WHERE agent_id = ? AND type = 'network' "
                  "AND state = 'ok' AND answered_at IS NOT NULL "
                  "ORDER BY COALESCE(issued_at, answered_at) DESC LIMIT 1")

REQUEST_COLUMNS = ("id, agent_id, type, params, issued_at, expires_at, state, answered_at, latency_ms, "
                   "data, error, expire_at, collected_at, received_at, job")
AGENT_COLUMNS = ("agent_id, online, first_seen, last_seen, hostname, platform, agent_version, types, status_at, "
                 "labels")
CHUNK = 500

log = logging.getLogger("fleet.persister")


def _json(value: Any) -> str | None:
    if value is None or isinstance(value, EncodedJSON):
        return value
    return orjson.dumps(value).decode("utf-8")


def _unjson(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _add_columns(db: sqlite3.Connection) -> None:
    """Bring a database made by an earlier release up to SCHEMA."""
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    for index in ADDED_INDEXES:
        db.execute(index)


def _add_latest(db: sqlite3.Connection) -> None:
    """Create the latest table if the database has none (made by an earlier release, or new) and
    fill it from the ok records it holds: one pass over requests, once, in one transaction, so
    persisters opening the file together fill it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'latest'").fetchone() is None:
            for statement in LATEST_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(LATEST_FROM_REQUESTS.format(where="state = 'ok' AND answered_at IS NOT NULL"))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _data_of(fields: Sequence[str] | None) -> str:
    """The SQL for a latest row's data, or only its top-level `fields` of it (names are checked:
    they go into the SQL text)."""
    if fields is None:
        return "data"
    pairs = ", ".join(f"'{name}', json_extract(data, '$.{name}')" for name in check_fields(fields))
    return f"json_object({pairs})"


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


CHECKPOINT_EVERY_S = 0.25
# The writer checkpoints by itself only when the background checkpointer falls this far behind.
WRITER_CHECKPOINT_PAGES = 16384  # 64 MiB of WAL at 4 KiB pages


@dataclass
class _Rows:
    """A batch as SQL parameters, made before the write transaction, by request id."""

    requests: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    responses: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    statuses: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = field(default_factory=list)
    rejected: list[tuple[Any, ...]] = field(default_factory=list)


def _rejected_row(r: RejectedRecord) -> tuple[Any, ...]:
    return (r.id, r.received_at, r.topic, r.reason, r.payload, r.detail)


class SqliteStore:
    """A Store in one SQLite file; safe to share between threads (calls are serialised).

    The first write starts a checkpointer thread with its own connection: copying the WAL into
    the database (and its fsync) is most of the cost of a commit, and done there it overlaps
    with the writer (sqlite3 releases the GIL). Readers never start it."""

    def __init__(self, path: str, retention_s: Mapping[str, int] = DEFAULT_RETENTION_S,
                 busy_timeout_ms: int = 5000, read_only: bool = False,
                 trend_retention_s: int = DEFAULT_TREND_RETENTION_S) -> None:
        """`read_only`: a reader's view (fleetctl status, history) that never creates the file,
        its folder or its schema; StoreMissing if there is no file."""
        self.path, self.retention_s = path, dict(retention_s)
        self.trend_retention_s = trend_retention_s
        self.read_only = read_only and path != ":memory:"
        self._lock = threading.Lock()
        self._file = str(Path(path).expanduser()) if path != ":memory:" else path
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._checkpointer: threading.Thread | None = None
        self._turns: IO[bytes] | None = None
        self._closing = threading.Event()
        self._written = threading.Event()
        if self.read_only and not Path(self._file).is_file():
            raise StoreMissing(f"no SQLite store at {Path(self._file).resolve()} (persister.sqlite_path {path!r}): "
                               "the file does not exist; start the stack ('fleetctl up') there, or pass the "
                               "--config of the stack whose store to read")
        try:
            if self.read_only:
                self._db = self._connect()
            else:
                if self._file != ":memory:":
                    Path(self._file).parent.mkdir(parents=True, exist_ok=True)
                self._db = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite database {path!r} ({exc}); check that "
                             "persister.sqlite_path names a file in a folder this user can write") from None

    def _open(self) -> sqlite3.Connection:
        """Connect, switch to WAL and create the schema. Several persisters starting together on
        a new file collide here, and SQLite answers some of those collisions (the switch to WAL)
        with 'database is locked' at once, without waiting: so wait here, up to busy_timeout."""
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        backoff = Backoff(0.01, 0.5)
        while True:
            db = self._connect()
            try:
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal" and self._file != ":memory:":
                    raise sqlite3.OperationalError(f"database is locked (journal mode stays {mode})")
                db.executescript(SCHEMA)
                _add_columns(db)
                _add_latest(db)
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(backoff.next())

    def _connect(self) -> sqlite3.Connection:
        # a reader opens the file read-only (mode=ro): it can never create it or change it
        target = f"{Path(self._file).resolve().as_uri()}?mode=ro" if self.read_only else self._file
        db = sqlite3.connect(target, uri=self.read_only, isolation_level=None, check_same_thread=False,
                             timeout=self._busy_timeout_ms / 1000)
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _start_checkpointer(self) -> None:
        if self._file == ":memory:":
            return
        self._db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit = {WRITER_CHECKPOINT_PAGES * 4096}")
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpointer",
                                              daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = self._connect()
        try:
            while not self._closing.wait(CHECKPOINT_EVERY_S):
                if not self._written.is_set():
                    continue
                self._written.clear()
                try:  # PASSIVE never waits for the writer or readers; what it cannot copy waits for next time
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    self._written.set()
                    log.debug("background checkpoint failed: %s", exc)
        finally:
            db.close()

    # write side
    def write(self, batch: Batch) -> list[RejectedRecord]:
        rows = self._rows(batch)  # before the transaction: it holds the database's one write lock
        with self._lock:
            if self._checkpointer is None:
                self._start_checkpointer()
            self._written.set()
            with self._writers_turn():
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    turned_away = self._apply(batch, rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        return turned_away

    def refuses(self, exc: BaseException) -> bool:
        # OperationalError (locked, busy, disk full, I/O) is about the database, not the data
        return isinstance(exc, (*DATA_ERRORS, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                                sqlite3.ProgrammingError))

    @contextmanager
    def _writers_turn(self) -> Iterator[None]:
        """Persisters sharing the file take turns at writing through a lock file. Waiting for
        SQLite's own lock means sleeping in growing steps (up to 100 ms) while the other commits in
        a few; this lock is polled every millisecond. After busy_timeout, SQLite's lock decides."""
        if self._file == ":memory:":
            yield
            return
        if self._turns is None:
            self._turns = open(self._file + ".writer-lock", "a+b")
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        held = False
        while not held:
            try:
                fcntl.flock(self._turns, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        try:
            yield
        finally:
            if held:
                fcntl.flock(self._turns, fcntl.LOCK_UN)

    def _rows(self, batch: Batch) -> _Rows:
        ret = self.retention_s
        out = _Rows()
        for item in batch.requests:
            r = item.message
            out.requests[id(item)] = (r.id, item.agent_id, r.type, _json(r.params),
                                      norm_ts(r.issued_at) or item.received_at, norm_ts(r.expires_at),
                                      retention_until(item.received_at, r.type, ret), r.job)
        for res in batch.responses:
            p = res.message
            collected = norm_ts(p.collected_at)
            out.responses[id(res)] = (p.id, p.agent_id, p.type, response_state(p),
                                      answer_time(collected, res.received_at), _json(p.data), _json(p.error),
                                      retention_until(res.received_at, p.type, ret), collected, res.received_at,
                                      None)
        for st in batch.statuses:
            s, seen = st.message, seen_at(st)
            out.statuses.append(((s.agent_id, seen, seen),
                                 (int(s.online), s.hostname, s.platform, s.agent_version, _json(s.types),
                                  _json(birth_labels(s)), st.received_at, s.agent_id, st.received_at)))
        out.rejected = [_rejected_row(r) for r in batch.rejected]
        return out

    def _apply(self, batch: Batch, rows: _Rows) -> list[RejectedRecord]:
        db = self._db
        ids = sorted({i.message.id for i in batch.requests} | {i.message.id for i in batch.responses})
        stored = {row[0]: row for chunk in _chunks(ids) for row in db.execute(
            "SELECT id, agent_id, type, issued_at, collected_at, received_at FROM requests WHERE id IN "
            f"({','.join('?' * len(chunk))})", chunk)}
        resolved = resolve(batch, {id_: Owner(agent, type_, issued is not None)
                                   for id_, agent, type_, issued, _, _ in stored.values()})
        turned_away = list(resolved.refused)
        if resolved.displaced:
            turned_away += self._displace(resolved.displaced)
            stored = {id_: row for id_, row in stored.items() if id_ not in resolved.displaced}
        db.executemany(UPSERT_REQUEST, [rows.requests[id(i)] for i in resolved.requests])
        answers = self._answers(resolved, rows, stored)
        db.executemany(UPSERT_TREND, self._trend_rows(answers, stored))  # before the answers: see _newest_network
        db.executemany(UPSERT_RESPONSE, answers)
        self._latest(answers)
        last_heard: dict[str, str] = {}
        for res in resolved.responses:
            last_heard[res.agent_id] = max(res.received_at, last_heard.get(res.agent_id, ""))
        db.executemany(SEEN_AGENT, [(agent_id, at, at) for agent_id, at in last_heard.items()])
        for seen, status in rows.statuses:
            db.execute(SEEN_AGENT, seen)
            db.execute(APPLY_STATUS, status)
        db.executemany(INSERT_REJECTED, rows.rejected + [_rejected_row(r) for r in turned_away])
        return turned_away

    def _answers(self, resolved: Resolved, rows: _Rows, stored: dict[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The response rows, with answered_at and latency where the request is known (stored, or in
        this batch); and for answers stored before the request that came now, their update."""
        issued = {id_: row[3] for id_, row in stored.items() if row[3] is not None}
        for item in resolved.requests:
            issued.setdefault(item.message.id, rows.requests[id(item)][4])
        out, answered = [], set()
        for res in resolved.responses:
            row, id_ = rows.responses[id(res)], res.message.id
            answered.add(id_)
            when = issued.get(id_)
            if when is not None:  # the answer's time checked against the request's (base.answer_time)
                at = answer_time(row[8], row[9], when)
                row = (*row[:4], at, *row[5:10], latency_ms(when, at))
            out.append(row)
        late = [(id_, row[4], row[5]) for id_, row in stored.items()
                if row[3] is None and row[5] is not None and id_ in issued and id_ not in answered]
        updates = []
        for id_, collected, received in late:  # the answer came first; its request now
            at = answer_time(collected, received, issued[id_])
            updates.append((at, latency_ms(issued[id_], at), id_))
        self._db.executemany("UPDATE requests SET answered_at = ?, latency_ms = ? WHERE id = ?", updates)
        self._db.executemany(LATEST_FROM_REQUESTS.format(where="id = ? AND state = 'ok'"), [(u[2],) for u in updates])
        return out

    def _latest(self, answers: list[tuple[Any, ...]]) -> None:
        """Move each agent's and type's latest row to the newest ok answer of the batch, if it is
        newer than the row's (UPSERT_LATEST). `answers` are the UPSERT_RESPONSE rows, which base.resolve
        has bound to their requests: an answer only ever reaches its own agent's and type's row."""
        newest: dict[tuple[str, str], tuple[Any, ...]] = {}
        for id_, agent_id, type_, state, answered_at, data, *_ in answers:
            if state != "ok" or answered_at is None:
                continue
            found = newest.get((agent_id, type_))
            if found is None or (answered_at, id_) > (found[3], found[2]):
                newest[agent_id, type_] = (agent_id, type_, id_, answered_at, data)
        self._db.executemany(UPSERT_LATEST, list(newest.values()))
    def _trend_rows(self, answers: list[tuple[Any, ...]], stored: dict[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The trend rows of the ok answers new to the store (trends.py). An answer stored before
        (a redelivery after a restart) is not new, so it is never counted twice."""
        fresh, seen = [], set()
        for id_, agent_id, type_, state, at, data, _, _, _, received, _ in answers:
            old = stored.get(id_)
            if type_ not in TREND_TYPES or state != "ok" or id_ in seen or (old is not None and old[5] is not None):
                continue
            seen.add(id_)
            fresh.append(Answer(agent_id, type_, at, None if data is None else orjson.loads(data.encode()), received))
        if not fresh:
            return []
        previous = {}
        for agent_id in sorted({a.agent_id for a in fresh if a.type == "network"}):
            newest = self._newest_network(agent_id)
            if newest is not None:
                previous[agent_id] = newest
        return [(r.agent_id, r.series, r.key, r.hour, r.count, r.sum, r.min, r.max, r.expire_at)
                for r in roll_up(fresh, previous, self.trend_retention_s)]

    def _newest_network(self, agent_id: str) -> Answer | None:
        """The agent's newest stored network answer, the one the first rate of a batch is counted
        from: read before the batch's answers are written, so a restart loses no rate."""
        row = self._db.execute(NEWEST_NETWORK, (agent_id,)).fetchone()
        return None if row is None else Answer(agent_id, "network", row[0], _unjson(row[1]), row[2] or row[0])

    def _displace(self, displaced: dict[str, Owner]) -> list[RejectedRecord]:
        """Move stored answers whose request names another agent or type to rejected."""
        ids = sorted(displaced)
        records = [self._request(row) for chunk in _chunks(ids) for row in self._db.execute(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE id IN ({','.join('?' * len(chunk))}) "
            "AND issued_at IS NULL", chunk)]
        self._db.executemany("DELETE FROM requests WHERE id = ? AND issued_at IS NULL", [(r.id,) for r in records])
        self._unlatest(records)
        return [displaced_letter(r, displaced[r.id]) for r in records]

    def _unlatest(self, records: list[RequestRecord]) -> None:
        """A latest row that held a displaced answer goes back to the newest ok record its agent
        and type still have (none: no row)."""
        for r in records:
            if self._db.execute("DELETE FROM latest WHERE agent_id = ? AND type = ? AND id = ?",
                                (r.agent_id, r.type, r.id)).rowcount:
                self._db.execute(LATEST_FROM_REQUESTS.format(
                    where="agent_id = ?1 AND type = ?2 AND state = 'ok' AND answered_at IS NOT NULL "
                          "ORDER BY answered_at DESC, id DESC LIMIT 1"), (r.agent_id, r.type))

    def expire_pending(self, now_s: float, grace_s: float) -> int:
        with self._lock:
            cur = self._db.execute("UPDATE requests SET state = 'expired', error = ? "
                                   "WHERE state = 'pending' AND expires_at < ?",
                                   (_json(EXPIRED_ERROR), iso(now_s - grace_s)))
            return cur.rowcount

    def purge(self, now_s: float) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute("DELETE FROM requests WHERE expire_at < ?", (iso(now_s),)).rowcount
                self._db.execute("DELETE FROM rejected WHERE received_at < ?",
                                 (iso(now_s - self.retention_s["default"]),))
                self._db.execute("DELETE FROM trends WHERE expire_at < ?", (iso(now_s),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return n

    # read side
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def agents(self) -> list[AgentRecord]:
        return [AgentRecord(agent_id=a, online=None if on is None else bool(on), first_seen=first, last_seen=last,
                            hostname=host, platform=plat, agent_version=ver, types=_unjson(types), status_at=st,
                            labels=_unjson(labels) or {})
                for a, on, first, last, host, plat, ver, types, st, labels
                in self._query(f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY agent_id")]

    def agent_stats(self, since_s: float) -> dict[str, Stats]:
        # Counts are grouped in SQLite; only answered latencies come back, for the medians.
        since = iso(since_s)
        counts = self._query("SELECT agent_id, state, COUNT(*) FROM requests "
                             "WHERE COALESCE(issued_at, answered_at) >= ? GROUP BY agent_id, state", (since,))
        latencies: dict[str, list[float]] = {}
        for agent_id, latency in self._query("SELECT agent_id, latency_ms FROM requests WHERE "
                                             "COALESCE(issued_at, answered_at) >= ? AND state IN ('ok', 'error') "
                                             "AND latency_ms IS NOT NULL", (since,)):
            latencies.setdefault(agent_id, []).append(latency)
        return summarise_counts(counts, latencies)

    def history(self, agent_id: str, type_: str, limit: int = 100,
                since_s: float | None = None) -> list[RequestRecord]:
        since = iso(since_s) if since_s is not None else ""
        rows = self._query(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE agent_id = ? AND type = ? "
                           "AND COALESCE(issued_at, answered_at) >= ? "
                           "ORDER BY COALESCE(issued_at, answered_at) DESC, id DESC LIMIT ?",
                           (agent_id, type_, since, limit))
        return [self._request(row) for row in rows]

    def get_request(self, id_: str) -> RequestRecord | None:
        rows = self._query(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?", (id_,))
        return self._request(rows[0]) if rows else None

    def job_requests(self, job_id: str) -> list[RequestRecord]:
        rows = self._query(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE job = ? ORDER BY agent_id, id", (job_id,))
        return [self._request(row) for row in rows]

    def latest(self, type_: str, since_s: float | None = None,
               fields: Sequence[str] | None = None) -> dict[str, RequestRecord]:
        since = iso(since_s) if since_s is not None else ""
        rows = self._latest_rows("type = ?1 AND answered_at >= ?2", (type_, since), _data_of(fields))
        return {r.agent_id: r.request() for r in rows}

    def latest_all(self, types: Collection[str] | None = None) -> list[LatestRecord]:
        if types is None:
            return self._latest_rows("1", ())
        wanted = sorted(set(types))
        return self._latest_rows(f"type IN ({','.join('?' * len(wanted))})", wanted) if wanted else []

    def _latest_rows(self, where: str, args: Sequence[Any], data: str = "data") -> list[LatestRecord]:
        sql = f"SELECT agent_id, type, id, answered_at, {data} FROM latest WHERE {where} ORDER BY agent_id, type"
        try:
            rows = self._query(sql, args)
        except sqlite3.OperationalError as exc:
            if "no such table: latest" not in str(exc):
                raise
            # a reader of a file no persister of this release has opened yet: the ok records, scanned
            rows = self._query(sql.replace("FROM latest WHERE", "FROM requests WHERE state = 'ok' AND "
                                           "answered_at IS NOT NULL AND"), args)
            return newest_per_key([LatestRecord(a, t, i, at, _unjson(d)) for a, t, i, at, d in rows])
        return [LatestRecord(a, t, i, at, _unjson(d)) for a, t, i, at, d in rows]

    def recent_requests(self, agent_id: str, limit: int = 50) -> list[RequestRecord]:
        # The agent's types by a skip-scan of the history index, then its newest of each type.
        types = [t for (t,) in self._query(
            "WITH RECURSIVE t(type) AS (SELECT MIN(type) FROM requests WHERE agent_id = ?1 UNION ALL "
            "SELECT (SELECT MIN(type) FROM requests WHERE agent_id = ?1 AND type > t.type) FROM t "
            "WHERE t.type IS NOT NULL) SELECT type FROM t WHERE type IS NOT NULL", (agent_id,))]
        found = [rec for type_ in types for rec in self.history(agent_id, type_, limit)]
        found.sort(key=lambda r: (r.issued_at or r.answered_at or "", r.id), reverse=True)
        return found[:limit]

    def trends(self, agent_id: str, series: str, since_s: float, until_s: float) -> list[TrendRecord]:
        try:
            rows = self._query("SELECT agent_id, series, key, hour, min, sum / count, max, count FROM trends "
                               "WHERE agent_id = ? AND series = ? AND hour >= ? AND hour < ? ORDER BY key, hour",
                               (agent_id, series, iso(since_s - since_s % 3600), iso(until_s)))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return []  # a reader of a file no persister with trends has written to yet
        return [TrendRecord(*row) for row in rows]

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        return [RejectedRecord(*row) for row in self._query(
            "SELECT id, received_at, topic, reason, payload, detail FROM rejected "
            "ORDER BY received_at DESC, id DESC LIMIT ?", (limit,))]

    def count_requests(self, *, agent_id: str | None = None, type_: str | None = None,
                       state: str | None = None) -> int:
        where = {"agent_id": agent_id, "type": type_, "state": state}
        used = {k: v for k, v in where.items() if v is not None}
        sql = "SELECT COUNT(*) FROM requests" + (" WHERE " + " AND ".join(f"{k} = ?" for k in used) if used else "")
        return int(self._query(sql, list(used.values()))[0][0])

    def type_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for type_, state, n in self._query("SELECT type, state, COUNT(*) FROM requests GROUP BY type, state", []):
            out.setdefault(type_, {})[state] = int(n)
        return out

    def close(self) -> None:
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join(10)
        with self._lock:
            self._db.close()
            if self._turns is not None:
                self._turns.close()

    @staticmethod
    def _request(row: Sequence[Any]) -> RequestRecord:
        (id_, agent_id, type_, params, issued, expires, state, answered, latency, data, error, expire_at,
         collected, received, job) = row
        return RequestRecord(id=id_, agent_id=agent_id, type=type_, params=_unjson(params), issued_at=issued,
                             expires_at=expires, state=state, answered_at=answered, latency_ms=latency,
                             data=_unjson(data), error=_unjson(error), expire_at=expire_at, collected_at=collected,
                             received_at=received, job=job)
