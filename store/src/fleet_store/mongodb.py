"""MongoDB store: database `fleet`, collections requests (_id = request id), agents
(_id = agent id), rejected (_id = dead-letter id), latest (one per agent_id and type,
a unique index) and trends (unique on agent_id, series, key, hour).

A batch is one ordered bulk write per collection, not a multi-document transaction
(those need a replica set). That is safe because every operation is an idempotent
upsert: if a bulk write fails part-way, the persister has acknowledged nothing and
re-applies the whole batch. Timestamps are RFC 3339 strings, as in the contract,
except `expire_at`, a BSON date so the TTL index can delete expired requests.

Trends are added after the requests are written, for the answers that were not stored before
the batch: a batch retried after a partial write may so leave an answer out of its hour's trend,
but never counts one twice.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.errors import BulkWriteError, ConnectionFailure, DocumentTooLarge, PyMongoError, WriteError

from fleet_common import Response, iso, parse_iso

from .base import (
    DATA_ERRORS,
    DEFAULT_RETENTION_S,
    DEFAULT_TREND_RETENTION_S,
    EXPIRED_ERROR,
    AgentRecord,
    Batch,
    Incoming,
    LatestRecord,
    Owner,
    RejectedRecord,
    RequestRecord,
    Stats,
    StoreError,
    StoreUnreachable,
    answer_time,
    birth_labels,
    check_fields,
    displaced_letter,
    latency_ms,
    newest_per_key,
    norm_ts,
    refused,
    resolve,
    response_state,
    retention_until,
    seen_at,
    summarise,
)
from .trends import TREND_TYPES, Answer, TrendRecord, TrendRow, roll_up

Doc = dict[str, Any]
DUPLICATE_KEY = 11000
# Server errors that pass with time (a primary stepping down, a shutdown, a time limit): not
# about the document, so a batch that meets one is retried as it is, not split.
TRANSIENT_CODES = frozenset({6, 7, 50, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})


def to_date(text: str) -> datetime:
    """A stored timestamp as the naive-UTC datetime pymongo reads back by default."""
    return datetime.fromtimestamp(parse_iso(text), tz=timezone.utc).replace(tzinfo=None)


def from_date(value: datetime | None) -> str | None:
    if value is None:
        return None
    return iso((value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp())


INT64 = (-(2 ** 63), 2 ** 63)


def _fit(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit(v) for v in value]
    if type(value) is int and not INT64[0] <= value < INT64[1]:
        return float(value)
    return value


def _fit_ints(batch: Batch) -> Batch:
    """The batch with every integer BSON cannot hold made a float."""
    return Batch(requests=[replace(i, message=replace(i.message, params=_fit(i.message.params)))
                           for i in batch.requests],
                 responses=[replace(i, message=replace(i.message, data=_fit(i.message.data),
                                                       error=_fit(i.message.error))) for i in batch.responses],
                 statuses=batch.statuses, rejected=batch.rejected)


def redact(uri: str) -> str:
    """The URI without its password, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


class MongoStore:
    """A Store in one MongoDB database; pass a MongoClient (or a mongomock one in tests)."""

    def __init__(self, client: MongoClient[Doc], retention_s: Mapping[str, int] = DEFAULT_RETENTION_S,
                 database: str = "fleet", trend_retention_s: int = DEFAULT_TREND_RETENTION_S) -> None:
        self.client, self.retention_s = client, dict(retention_s)
        self.trend_retention_s = trend_retention_s
        self.db = client[database]
        self.trends_c = self.db["trends"]
        self.trends_c.create_index([("agent_id", ASCENDING), ("series", ASCENDING), ("key", ASCENDING),
                                    ("hour", ASCENDING)], unique=True)
        self.trends_c.create_index([("expire_at", ASCENDING)], expireAfterSeconds=0)
        self.requests, self.agents_c, self.rejected_c = self.db["requests"], self.db["agents"], self.db["rejected"]
        self.requests.create_index([("agent_id", ASCENDING), ("type", ASCENDING), ("issued_at", DESCENDING)])
        self.requests.create_index([("state", ASCENDING), ("expires_at", ASCENDING)])
        self.requests.create_index([("issued_at", ASCENDING)])
        # the dashboard's reads: newest answer of a type per agent, an agent's newest requests
        self.requests.create_index([("type", ASCENDING), ("state", ASCENDING), ("agent_id", ASCENDING),
                                    ("issued_at", DESCENDING)])
        self.requests.create_index([("agent_id", ASCENDING), ("issued_at", DESCENDING)])
        self.requests.create_index([("expire_at", ASCENDING)], expireAfterSeconds=0)
        # fleetctl job: a job's requests; partial, so the controller's (no job) cost it nothing
        self.requests.create_index([("job", ASCENDING)], partialFilterExpression={"job": {"$type": "string"}})
        self.rejected_c.create_index([("received_at", DESCENDING)])
        self._add_latest()

    def _add_latest(self) -> None:
        """The latest collection and its unique index; a database that had none is filled once
        from the ok records of requests (one aggregation; doing it twice changes nothing)."""
        self.latest_c = self.db["latest"]
        fill = "latest" not in self.db.list_collection_names()
        self.latest_c.create_index([("agent_id", ASCENDING), ("type", ASCENDING)], unique=True)
        self.latest_c.create_index([("type", ASCENDING), ("answered_at", ASCENDING)])
        if fill:
            pipeline: list[Doc] = [
                {"$match": {"state": "ok", "answered_at": {"$ne": None}}},
                {"$sort": {"answered_at": DESCENDING, "_id": DESCENDING}},
                {"$group": {"_id": {"agent_id": "$agent_id", "type": "$type"}, "id": {"$first": "$_id"},
                            "answered_at": {"$first": "$answered_at"}, "data": {"$first": "$data"}}}]
            self._upsert_latest([LatestRecord(row["_id"]["agent_id"], row["_id"]["type"], row["id"],
                                              row["answered_at"], row.get("data"))
                                 for row in self.requests.aggregate(pipeline, allowDiskUse=True)])

    @classmethod
    def from_uri(cls, uri: str, retention_s: Mapping[str, int] = DEFAULT_RETENTION_S, database: str = "fleet",
                 timeout_s: float = 5.0, trend_retention_s: int = DEFAULT_TREND_RETENTION_S) -> MongoStore:
        """Connect and check the server answers. StoreUnreachable if it does not (worth retrying);
        StoreError for anything else (a bad URI, failed authentication: fix the config)."""
        try:
            client: MongoClient[Doc] = MongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000),
                                                   connect=True)
        except (PyMongoError, ValueError, TypeError) as exc:  # pymongo raises ValueError for some bad URIs
            raise StoreError(f"persister.mongodb_uri {redact(uri)!r} is not usable ({type(exc).__name__}: "
                             f"{redact(str(exc))[:200]})") from None
        try:
            client.admin.command("ping")
            return cls(client, retention_s, database, trend_retention_s)
        except PyMongoError as exc:
            client.close()
            error = StoreUnreachable if isinstance(exc, ConnectionFailure) else StoreError
            raise error(f"cannot reach MongoDB at {redact(uri)} ({type(exc).__name__}: {str(exc)[:200]}); "
                        "check persister.mongodb_uri and that mongod is running and reachable") from None

    # write side
    def write(self, batch: Batch) -> list[RejectedRecord]:
        try:
            return self._write(batch)
        except OverflowError:
            # BSON holds integers of 64 bits with a sign; JSON (and SQLite) hold up to 2**64 - 1.
            # Rare (a counter past 2**63), so found here, not checked on every message: such
            # integers are written as floats, as larger ones already are, and the batch again.
            return self._write(_fit_ints(batch))

    def refuses(self, exc: BaseException) -> bool:
        if isinstance(exc, (*DATA_ERRORS, InvalidDocument, DocumentTooLarge)):
            return True
        if isinstance(exc, (BulkWriteError, WriteError)):  # the server refused a document
            details = exc.details or {}
            codes = [e.get("code") for e in details.get("writeErrors", [])] or [getattr(exc, "code", None)]
            return not any(code in TRANSIENT_CODES for code in codes)
        return False

    def _write(self, batch: Batch) -> list[RejectedRecord]:
        ids = sorted({i.message.id for i in batch.requests} | {i.message.id for i in batch.responses})
        found = list(self.requests.find({"_id": {"$in": ids}}, {"agent_id": 1, "type": 1, "issued_at": 1,
                                                                 "received_at": 1})) if ids else []
        owners = {d["_id"]: Owner(d["agent_id"], d["type"], d.get("issued_at") is not None) for d in found}
        answered = {d["_id"] for d in found if d.get("received_at") is not None}
        resolved = resolve(batch, owners)
        trend_rows = self._trend_rows(resolved.responses, answered)
        turned_away = list(resolved.refused)
        if resolved.displaced:
            turned_away += self._displace(resolved.displaced)
        ret = self.retention_s
        ops: list[Any] = []
        sources: list[Incoming[Any]] = []  # the message of each op, to name one the server refuses
        for item in resolved.requests:
            r = item.message
            issued = norm_ts(r.issued_at) or item.received_at
            mine = {"_id": r.id, "agent_id": item.agent_id, "type": r.type}
            ops.append(UpdateOne(mine, {"$setOnInsert": {
                "id": r.id, "params": r.params, "issued_at": issued, "expires_at": norm_ts(r.expires_at),
                "state": "pending", "answered_at": None, "latency_ms": None, "data": None, "error": None,
                "collected_at": None, "received_at": None, "job": r.job,
                "expire_at": to_date(retention_until(item.received_at, r.type, ret))}}, upsert=True))
            # an answer stored first left the request's fields empty: fill them, never overwrite them
            ops.append(UpdateOne({**mine, "issued_at": None}, {"$set": {
                "issued_at": issued, "params": r.params, "expires_at": norm_ts(r.expires_at), "job": r.job}}))
            sources += [item, item]
        agents: list[Any] = []
        for res in resolved.responses:
            p = res.message
            collected = norm_ts(p.collected_at)
            ops.append(UpdateOne({"_id": p.id, "agent_id": p.agent_id, "type": p.type}, {"$set": {
                "state": response_state(p), "answered_at": answer_time(collected, res.received_at), "data": p.data,
                "error": p.error, "collected_at": collected, "received_at": res.received_at,
                "expire_at": to_date(retention_until(res.received_at, p.type, ret))}, "$setOnInsert": {
                "id": p.id, "params": None, "issued_at": None, "expires_at": None, "latency_ms": None}},
                upsert=True))
            sources.append(res)
            agents.append(self._seen(p.agent_id, res.received_at))
        if ops:
            turned_away += self._bulk(ops, sources)
        self._add_trends(trend_rows)
        for st in batch.statuses:
            s = st.message
            agents.append(self._seen(s.agent_id, seen_at(st)))
            change = {"online": s.online, "status_at": st.received_at}
            change.update({k: v for k, v in (("hostname", s.hostname), ("platform", s.platform),
                                             ("agent_version", s.agent_version), ("types", s.types),
                                             ("labels", birth_labels(s)))
                           if v is not None})
            agents.append(UpdateOne({"_id": s.agent_id, "$or": [{"status_at": None},
                                                                 {"status_at": {"$lte": st.received_at}}]},
                                    {"$set": change}))
        if agents:
            self.agents_c.bulk_write(agents, ordered=True)
        self._insert_rejected([*batch.rejected, *turned_away])
        self._complete_pairs([i.message.id for i in resolved.requests] + [i.message.id for i in resolved.responses])
        self._latest([i.message.id for i in resolved.requests] + [i.message.id for i in resolved.responses])
        return turned_away

    def _latest(self, ids: list[str]) -> None:
        """Move the latest documents to the batch's newest ok answers, read back from requests once
        they are written (so with their final answered_at, and only what the store bound to its
        request: an answer it refused is not there)."""
        if not ids:
            return
        docs = self.requests.find({"_id": {"$in": sorted(set(ids))}, "state": "ok", "answered_at": {"$ne": None}},
                                  {"agent_id": 1, "type": 1, "answered_at": 1, "data": 1})
        self._upsert_latest(newest_per_key([LatestRecord(d["agent_id"], d["type"], d["_id"], d["answered_at"],
                                                         d.get("data")) for d in docs]))

    def _upsert_latest(self, records: list[LatestRecord]) -> None:
        """Never backwards: a document is replaced only where it is older (answered_at, then id). Where
        it is not, the filter matches nothing and the upsert's insert meets the unique index: a
        duplicate key, which means a newer one is there (or was inserted meanwhile: so try again once,
        when the filter sees it)."""
        for _ in range(2):
            if not records:
                return
            ops = [UpdateOne({"agent_id": r.agent_id, "type": r.type, "$or": [
                {"answered_at": {"$lt": r.answered_at}}, {"answered_at": r.answered_at, "id": {"$lt": r.id}}]},
                {"$set": {"id": r.id, "answered_at": r.answered_at, "data": r.data}}, upsert=True) for r in records]
            try:
                self.latest_c.bulk_write(ops, ordered=False)
                return
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                records = [records[e["index"]] for e in errors]
    def _trend_rows(self, responses: list[Incoming[Response]], answered: set[str]) -> list[TrendRow]:
        """The trend rows of the ok answers new to the store (trends.py), made before the batch is
        written, so the network rates start from the newest answer stored before it."""
        fresh: dict[str, Answer] = {}
        for res in responses:
            p = res.message
            if p.type in TREND_TYPES and p.status == "ok" and p.id not in answered and p.id not in fresh:
                fresh[p.id] = Answer(p.agent_id, p.type, answer_time(norm_ts(p.collected_at), res.received_at),
                                     p.data, res.received_at)
        if not fresh:
            return []
        previous = {}
        for agent_id in sorted({a.agent_id for a in fresh.values() if a.type == "network"}):
            newest = self._newest_network(agent_id)
            if newest is not None:
                previous[agent_id] = newest
        return roll_up(fresh.values(), previous, self.trend_retention_s)

    def _newest_network(self, agent_id: str) -> Answer | None:
        """The agent's newest stored network answer: of those with a request, by the request's index;
        of the few stored before their request came (no issued_at), by answered_at."""
        mine: Doc = {"agent_id": agent_id, "type": "network", "state": "ok", "answered_at": {"$ne": None}}
        found = [d for d in (self.requests.find_one(mine, sort=[("issued_at", DESCENDING)]),
                             self.requests.find_one({**mine, "issued_at": None}, sort=[("answered_at", DESCENDING)]))
                 if d is not None]
        if not found:
            return None
        d = max(found, key=lambda doc: str(doc["answered_at"]))
        return Answer(agent_id, "network", d["answered_at"], d.get("data"), d.get("received_at") or d["answered_at"])

    def _add_trends(self, rows: list[TrendRow]) -> None:
        if rows:
            self.trends_c.bulk_write([UpdateOne(
                {"agent_id": r.agent_id, "series": r.series, "key": r.key, "hour": r.hour},
                {"$inc": {"count": r.count, "sum": r.sum}, "$min": {"min": r.min},
                 "$max": {"max": r.max, "expire_at": to_date(r.expire_at)}}, upsert=True) for r in rows],
                ordered=False)

    def _bulk(self, ops: list[Any], sources: list[Incoming[Any]]) -> list[RejectedRecord]:
        """The request upserts: unordered, so that one the server turns away does not stop the rest.
        Every upsert names the record's agent and type, so a record that another persister gave
        to another agent meanwhile fails its insert with a duplicate key: that message is refused."""
        try:
            self.requests.bulk_write(ops, ordered=False)
            return []
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
        out: dict[int, RejectedRecord] = {}
        for e in errors:
            item = sources[e["index"]]
            out[id(item)] = refused(item, "request_mismatch", f"request id {item.message.id} belongs to another "
                                    f"agent or type than {item.agent_id!r}/{item.message.type!r} (written meanwhile)")
        return list(out.values())

    def _displace(self, displaced: dict[str, Owner]) -> list[RejectedRecord]:
        """Move stored answers whose request names another agent or type to rejected: the dead
        letters first (their ids are made from them, so doing it twice keeps one), then the delete."""
        docs = list(self.requests.find({"_id": {"$in": sorted(displaced)}, "issued_at": None}))
        letters = [displaced_letter(self._request(d), displaced[d["_id"]]) for d in docs]
        self._insert_rejected(letters)
        if docs:
            self.requests.delete_many({"_id": {"$in": [d["_id"] for d in docs]}, "issued_at": None})
            self._unlatest(docs)
        return letters

    def _unlatest(self, docs: list[Doc]) -> None:
        """A latest document that held a displaced answer goes back to the newest ok record its agent
        and type still have (none: no document)."""
        for d in docs:
            key = {"agent_id": d["agent_id"], "type": d["type"]}
            if self.latest_c.delete_one({**key, "id": d["_id"]}).deleted_count:
                found = self.requests.find({**key, "state": "ok", "answered_at": {"$ne": None}}).sort(
                    [("answered_at", DESCENDING), ("_id", DESCENDING)]).limit(1)
                self._upsert_latest([LatestRecord(r["agent_id"], r["type"], r["_id"], r["answered_at"], r.get("data"))
                                     for r in found])

    def _insert_rejected(self, letters: list[RejectedRecord]) -> None:
        if letters:
            self.rejected_c.bulk_write([UpdateOne({"_id": r.id}, {"$setOnInsert": {
                "received_at": r.received_at, "topic": r.topic, "reason": r.reason, "payload": r.payload,
                "detail": r.detail}}, upsert=True) for r in letters], ordered=True)

    @staticmethod
    def _seen(agent_id: str, at: str) -> Any:
        return UpdateOne({"_id": agent_id}, {"$max": {"last_seen": at}, "$setOnInsert": {
            "agent_id": agent_id, "first_seen": at, "online": None, "hostname": None, "platform": None,
            "agent_version": None, "types": None, "status_at": None}}, upsert=True)

    def _complete_pairs(self, ids: list[str]) -> None:
        if not ids:
            return
        docs = self.requests.find({"_id": {"$in": sorted(set(ids))}, "issued_at": {"$ne": None},
                                   "received_at": {"$ne": None}}, {"issued_at": 1, "collected_at": 1, "received_at": 1})
        ops = []
        for d in docs:
            answered = answer_time(d.get("collected_at"), d["received_at"], d["issued_at"])
            ops.append(UpdateOne({"_id": d["_id"]}, {"$set": {
                "answered_at": answered, "latency_ms": latency_ms(d["issued_at"], answered)}}))
        if ops:
            self.requests.bulk_write(ops, ordered=False)

    def expire_pending(self, now_s: float, grace_s: float) -> int:
        result = self.requests.update_many(
            {"state": "pending", "expires_at": {"$lt": iso(now_s - grace_s)}},
            {"$set": {"state": "expired", "error": dict(EXPIRED_ERROR)}})
        return int(result.modified_count)

    def purge(self, now_s: float) -> int:
        n = self.requests.delete_many({"expire_at": {"$lt": to_date(iso(now_s))}}).deleted_count
        self.rejected_c.delete_many({"received_at": {"$lt": iso(now_s - self.retention_s["default"])}})
        self.trends_c.delete_many({"expire_at": {"$lt": to_date(iso(now_s))}})
        return int(n)

    # read side
    def agents(self) -> list[AgentRecord]:
        return [AgentRecord(agent_id=d["_id"], online=d.get("online"), first_seen=d["first_seen"],
                            last_seen=d["last_seen"], hostname=d.get("hostname"), platform=d.get("platform"),
                            agent_version=d.get("agent_version"), types=d.get("types"), status_at=d.get("status_at"),
                            labels=d.get("labels") or {})
                for d in self.agents_c.find().sort("_id", ASCENDING)]

    def agent_stats(self, since_s: float) -> dict[str, Stats]:
        since = iso(since_s)
        docs = self.requests.find({"$or": [{"issued_at": {"$gte": since}},
                                           {"issued_at": None, "answered_at": {"$gte": since}}]},
                                  {"agent_id": 1, "state": 1, "latency_ms": 1})
        return summarise([(d["agent_id"], d["state"], d.get("latency_ms")) for d in docs])

    def history(self, agent_id: str, type_: str, limit: int = 100,
                since_s: float | None = None) -> list[RequestRecord]:
        query: Doc = {"agent_id": agent_id, "type": type_}
        if since_s is not None:
            since = iso(since_s)
            query["$or"] = [{"issued_at": {"$gte": since}}, {"issued_at": None, "answered_at": {"$gte": since}}]
        cursor = self.requests.find(query).sort([("issued_at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [self._request(d) for d in cursor]

    def get_request(self, id_: str) -> RequestRecord | None:
        doc = self.requests.find_one({"_id": id_})
        return self._request(doc) if doc else None

    def job_requests(self, job_id: str) -> list[RequestRecord]:
        cursor = self.requests.find({"job": job_id}).sort([("agent_id", ASCENDING), ("_id", ASCENDING)])
        return [self._request(d) for d in cursor]

    def latest(self, type_: str, since_s: float | None = None,
               fields: Sequence[str] | None = None) -> dict[str, RequestRecord]:
        query: Doc = {"type": type_}
        if since_s is not None:
            query["answered_at"] = {"$gte": iso(since_s)}
        wanted = None if fields is None else [f"data.{name}" for name in check_fields(fields)]
        records = self._latest_docs(query, wanted)
        if fields is not None:
            records = [replace(r, data={name: (r.data or {}).get(name) for name in fields}) for r in records]
        return {r.agent_id: r.request() for r in records}

    def latest_all(self, types: Collection[str] | None = None) -> list[LatestRecord]:
        return self._latest_docs({} if types is None else {"type": {"$in": sorted(set(types))}})

    def _latest_docs(self, query: Doc, data: list[str] | None = None) -> list[LatestRecord]:
        projection: Doc = {"_id": 0} if data is None else {"_id": 0, "agent_id": 1, "type": 1, "id": 1,
                                                           "answered_at": 1, **dict.fromkeys(data, 1)}
        cursor = self.latest_c.find(query, projection).sort([("agent_id", ASCENDING), ("type", ASCENDING)])
        return [LatestRecord(d["agent_id"], d["type"], d["id"], d["answered_at"], d.get("data")) for d in cursor]

    def recent_requests(self, agent_id: str, limit: int = 50) -> list[RequestRecord]:
        cursor = self.requests.find({"agent_id": agent_id}).sort(
            [("issued_at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [self._request(d) for d in cursor]

    def trends(self, agent_id: str, series: str, since_s: float, until_s: float) -> list[TrendRecord]:
        cursor = self.trends_c.find({"agent_id": agent_id, "series": series,
                                     "hour": {"$gte": iso(since_s - since_s % 3600), "$lt": iso(until_s)}}).sort(
            [("key", ASCENDING), ("hour", ASCENDING)])
        return [TrendRecord(agent_id=d["agent_id"], series=d["series"], key=d["key"], hour=d["hour"], min=d["min"],
                            avg=d["sum"] / d["count"], max=d["max"], count=d["count"]) for d in cursor]

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        cursor = self.rejected_c.find().sort([("received_at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [RejectedRecord(id=d["_id"], received_at=d["received_at"], topic=d["topic"], reason=d["reason"],
                               payload=d["payload"], detail=d.get("detail", "")) for d in cursor]

    def count_requests(self, *, agent_id: str | None = None, type_: str | None = None,
                       state: str | None = None) -> int:
        query = {k: v for k, v in (("agent_id", agent_id), ("type", type_), ("state", state)) if v is not None}
        return int(self.requests.count_documents(query))

    def type_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        pipeline = [{"$group": {"_id": {"type": "$type", "state": "$state"}, "n": {"$sum": 1}}}]
        for row in self.requests.aggregate(pipeline):
            out.setdefault(row["_id"]["type"], {})[row["_id"]["state"]] = int(row["n"])
        return out

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _request(d: Doc) -> RequestRecord:
        return RequestRecord(id=d["_id"], agent_id=d["agent_id"], type=d["type"], params=d.get("params"),
                             issued_at=d.get("issued_at"), expires_at=d.get("expires_at"), state=d["state"],
                             answered_at=d.get("answered_at"), latency_ms=d.get("latency_ms"), data=d.get("data"),
                             error=d.get("error"), expire_at=from_date(d.get("expire_at")),
                             collected_at=d.get("collected_at"), received_at=d.get("received_at"), job=d.get("job"))
