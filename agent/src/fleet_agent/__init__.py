"""fleet-agent: answers telemetry requests over MQTT with psutil readings of this host."""

from fleet_common.version import dist_version

__version__ = dist_version("fleet-agent")
