"""Prometheus metrics of the controller, read from its counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_common.metrics import broker_families

from .controller import Controller


def snapshot(controller: Controller) -> dict[str, Any]:
    """The controller's counters, for the heartbeat and the metrics."""
    return {**controller.stats(), "mqtt_reconnects": controller.link.reconnects,
            "broker": controller.broker.snapshot()}


class ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        s = snapshot(self.controller)
        issued = CounterMetricFamily("fleet_controller_requests_issued",
                                     "Requests published to agents, per request type", labels=["type"])
        for type_ in sorted(self.controller.schedule.rules.types() | set(s["issued"])):
            issued.add_metric([type_], s["issued"].get(type_, 0))
        yield issued
        yield CounterMetricFamily("fleet_controller_requests_skipped",
                                  "Requests not sent because the broker was unreachable", value=s["skipped"])
        yield CounterMetricFamily("fleet_controller_malformed_status",
                                  "Status messages ignored because they break the contract",
                                  value=s["malformed_status"])
        yield GaugeMetricFamily("fleet_controller_agents_known", "Agents this controller schedules",
                                value=s["agents_known"])
        yield GaugeMetricFamily("fleet_controller_agents_online", "Agents whose last status said online",
                                value=s["agents_online"])
        yield GaugeMetricFamily("fleet_controller_mqtt_connected", "1 while connected to the broker",
                                value=1 if s["connected"] else 0)
        yield CounterMetricFamily("fleet_controller_mqtt_reconnects",
                                  "Connections to the broker after the first", value=s["mqtt_reconnects"])
        d = s["dispatch"]
        yield GaugeMetricFamily("fleet_controller_dispatch_budget_per_s",
                                "Most requests sent in any second (controller.max_dispatch_per_s)",
                                value=d["budget_per_s"])
        yield GaugeMetricFamily("fleet_controller_dispatch_rate_per_s", "Requests sent in the last second",
                                value=d["rate_per_s"])
        yield CounterMetricFamily("fleet_controller_requests_deferred",
                                  "Ticks a due request waited for the budget, summed over requests",
                                  value=d["deferred"])
        yield CounterMetricFamily("fleet_controller_requests_coalesced",
                                  "Due requests that waited until they fell due again, and were sent once",
                                  value=d["coalesced"])
        waiting = GaugeMetricFamily("fleet_controller_requests_waiting",
                                    "Requests waiting for the budget: due on the schedule, or an agent's first round",
                                    labels=["kind"])
        waiting.add_metric(["due"], d["waiting_due"])
        waiting.add_metric(["first_round"], d["waiting_first_round"])
        yield waiting
        yield from broker_families(s["broker"])


def registry_for(controller: Controller) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ControllerCollector(controller))
    return registry
