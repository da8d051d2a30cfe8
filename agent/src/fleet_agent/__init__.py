"""fleet-agent: answers telemetry requests over MQTT with psutil readings of this host."""

__version__ = "0.1.0"
