"""Built-in collectors, registered by request type name.

A collector is a function `collect(params: dict) -> dict` registered with
`@register("type")`. It raises BadParams for params it does not accept (the agent
answers `bad_request`); any other exception becomes `collector_failed`. Data must be
lists of objects, never objects keyed by names from the host.
"""

from __future__ import annotations

from . import cpu, disk, memory, network, os_info, ping, processes
from .base import PRIMERS, REGISTRY, BadParams, Collector, checked_params, jsonable, prime_all, register, unregister

BUILTIN = ("cpu", "disk", "memory", "network", "os_info", "ping", "processes")

__all__ = [
    "BUILTIN", "PRIMERS", "REGISTRY", "BadParams", "Collector", "checked_params", "cpu", "disk", "jsonable",
    "memory", "network", "os_info", "ping", "prime_all", "processes", "register", "unregister",
]
