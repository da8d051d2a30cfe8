"""Prometheus metrics of the persister: its counters, read at scrape time, and the store
measured by a wrapper (batch sizes, commit times, requests and answers per type)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_common.metrics import broker_families
from fleet_store import Batch, RejectedRecord, StoreWriter
from fleet_store.base import response_state

from .persister import Persister

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MeasuredStore:
    """A StoreWriter that counts what was committed; the counts move only after a write succeeds,
    so a batch retried after a failure is counted once."""

    def __init__(self, inner: StoreWriter, registry: CollectorRegistry | None = None) -> None:
        self.inner = inner
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.batch_size = Histogram("fleet_persister_batch_size", "Messages per committed batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram("fleet_persister_commit_seconds",
                                        "Time to write one batch to the store (successful attempts)",
                                        buckets=COMMIT_BUCKETS, registry=self.registry)
        self.requests: dict[str, int] = {}
        self.answers: dict[tuple[str, str], int] = {}
        self.failing = False

    def write(self, batch: Batch) -> list[RejectedRecord]:
        started = time.perf_counter()
        try:
            turned_away = self.inner.write(batch)
        except Exception:
            self.failing = True
            raise
        self.failing = False
        self.commit_seconds.observe(time.perf_counter() - started)
        self.batch_size.observe(len(batch))
        for r in batch.requests:
            self.requests[r.message.type] = self.requests.get(r.message.type, 0) + 1
        for p in batch.responses:
            key = (p.message.type, response_state(p.message))
            self.answers[key] = self.answers.get(key, 0) + 1
        return turned_away

    def refuses(self, exc: BaseException) -> bool:
        return self.inner.refuses(exc)

    def expire_pending(self, now_s: float, grace_s: float) -> int:
        return self.inner.expire_pending(now_s, grace_s)

    def purge(self, now_s: float) -> int:
        return self.inner.purge(now_s)

    def close(self) -> None:
        self.inner.close()


def snapshot(persister: Persister) -> dict[str, Any]:
    """The persister's counters, for the heartbeat and the metrics."""
    c = persister.counters
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    out["rejected"] = dict(c.rejected)  # one C-level copy: the network thread may add a reason
    stage = persister.stage
    out.update(backlog=persister.queue.qsize() + (stage.held() if stage else 0),
               connected=persister.link.connected.is_set(), mqtt_reconnects=persister.link.reconnects,
               parse_workers=persister.workers, parse_worker_restarts=stage.restarts if stage else 0,
               broker=persister.broker.snapshot())
    return out


def problems(persister: Persister, store: MeasuredStore) -> list[str]:
    found = []
    if not persister.link.connected.is_set():
        found.append(f"not connected to the broker at {persister.link.where}")
    if store.failing:
        found.append("store writes are failing (see the log); nothing is acknowledged meanwhile")
    return found


class PersisterCollector(Collector):
    def __init__(self, persister: Persister, store: MeasuredStore) -> None:
        self.persister, self.store = persister, store

    def collect(self) -> Iterator[Metric]:
        s = snapshot(self.persister)
        for name, key, doc in (("messages_received", "received", "Messages received from the broker"),
                               ("messages_stored", "stored", "Valid messages committed to the store"),
                               ("batches", "batches", "Batches committed"),
                               ("write_failures", "write_failures", "Failed store writes (each is retried)"),
                               ("requests_expired", "expired",
                                "Requests marked expired by the sweep: no answer by expires_at plus the grace"),
                               ("purged", "purged", "Requests deleted past their retention")):
            yield CounterMetricFamily(f"fleet_persister_{name}", doc, value=s[key])
        rejected = CounterMetricFamily("fleet_persister_rejected", "Messages rejected (dead letters), per reason",
                                       labels=["reason"])
        for reason, n in sorted(s["rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield from self._per_type()
        yield GaugeMetricFamily("fleet_persister_backlog", "Messages received and not yet committed",
                                value=s["backlog"])
        yield GaugeMetricFamily("fleet_persister_mqtt_connected", "1 while connected to the broker",
                                value=1 if s["connected"] else 0)
        yield CounterMetricFamily("fleet_persister_mqtt_reconnects", "Connections to the broker after the first",
                                  value=s["mqtt_reconnects"])
        yield GaugeMetricFamily("fleet_persister_parse_workers", "Worker processes that parse messages (0: none)",
                                value=s["parse_workers"])
        yield CounterMetricFamily("fleet_persister_parse_worker_restarts",
                                  "Times a parse worker stopped unexpectedly and new ones were started",
                                  value=s["parse_worker_restarts"])
        if s["last_commit_ms"] is not None:
            yield GaugeMetricFamily("fleet_persister_last_commit_seconds", "Duration of the latest commit",
                                    value=s["last_commit_ms"] / 1000.0)
        yield from broker_families(s["broker"])

    def _per_type(self) -> Iterator[Metric]:
        requests, answers = dict(self.store.requests), dict(self.store.answers)
        issued = CounterMetricFamily("fleet_persister_requests", "Requests stored, per type (whoever issued them)",
                                     labels=["type"])
        answered = CounterMetricFamily("fleet_persister_answers",
                                       "Responses stored, per type and state (ok, error, expired)",
                                       labels=["type", "state"])
        ratio = GaugeMetricFamily("fleet_persister_answered_ratio",
                                  "Answers (ok or error) per stored request since this persister started, per type",
                                  labels=["type"])
        for type_, n in sorted(requests.items()):
            issued.add_metric([type_], n)
            done = answers.get((type_, "ok"), 0) + answers.get((type_, "error"), 0)
            ratio.add_metric([type_], min(1.0, done / n))
        for (type_, state), n in sorted(answers.items()):
            answered.add_metric([type_, state], n)
        yield issued
        yield answered
        yield ratio


def register(persister: Persister, store: MeasuredStore) -> CollectorRegistry:
    store.registry.register(PersisterCollector(persister, store))
    return store.registry
