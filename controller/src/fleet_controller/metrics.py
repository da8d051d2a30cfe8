"""Prometheus metrics of the controller, read from its counters at scrape time."""

from __future__ import annotations

from typing import Any, Dict, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .controller import Controller


def snapshot(controller: Controller) -> Dict[str, Any]:
    """The controller's counters, for the heartbeat and the metrics."""
    return {**controller.stats(), "mqtt_reconnects": controller.link.reconnects}


class ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        s = snapshot(self.controller)
        issued = CounterMetricFamily("fleet_controller_requests_issued",
                                     "Requests published to agents, per request type", labels=["type"])
        for type_ in sorted(set(self.controller.intervals_s) | set(s["issued"])):
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


def registry_for(controller: Controller) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ControllerCollector(controller))
    return registry
