"""The Prometheus endpoint of the controller and the persister, switched on by
`<section>.metrics_enabled`. "Off" is a null object, so the services never test a flag.

prometheus_client is imported only when the endpoint is on: it is a dependency of the
controller and the persister, not of fleet-common (the agent stays small and exposes none).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger("fleet.metrics")


class MetricsServer(Protocol):
    url: str | None

    def stop(self) -> None: ...


class NoMetrics:
    """metrics_enabled: false."""

    url: str | None = None

    def stop(self) -> None:
        pass


class HttpMetrics:
    """GET http://host:port/metrics serves `registry` on a daemon thread."""

    def __init__(self, registry: Collector, host: str, port: int, section: str) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise ConfigError(f"{section}.metrics_port",
                              f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                              f"choose a free port or set {section}.metrics_enabled: false") from None
        shown = f"[{host}]" if ":" in host else host
        self.url: str | None = f"http://{shown}:{self._server.server_port}/metrics"
        log.info("serving Prometheus metrics at %s", self.url)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def serve_metrics(section: str, section_cfg: Any, registry: Collector) -> MetricsServer:
    """The endpoint `section_cfg` (a controller or persister config) asks for, or NoMetrics."""
    metrics = section_cfg.metrics
    if not metrics.enabled:
        return NoMetrics()
    return HttpMetrics(registry, metrics.host, metrics.port, section)


def broker_families(snapshot: Mapping[str, Any]) -> Iterator[Any]:
    """The broker's own figures as its $SYS tree gave them (see brokerwatch.BrokerWatch)."""
    from prometheus_client.core import GaugeMetricFamily

    yield GaugeMetricFamily("fleet_broker_messages_dropped",
                            "Messages the broker dropped since it started (a client's queue was full), "
                            "from $SYS/broker/publish/messages/dropped", value=snapshot.get("dropped") or 0)
    if snapshot.get("stored") is not None:
        yield GaugeMetricFamily("fleet_broker_messages_stored",
                                "Messages the broker holds, from $SYS/broker/store/messages/count",
                                value=snapshot["stored"])
    yield GaugeMetricFamily("fleet_broker_sys_tree", "1 if the broker publishes the $SYS tree these come from",
                            value=1 if snapshot.get("sys") else 0)


__all__ = ["HttpMetrics", "MetricsServer", "NoMetrics", "broker_families", "serve_metrics"]
