"""`fleetctl request`: its `--param key=value` pairs. Asking the agent and waiting for its
answer is fleet_common.ask, which the dashboard's "ask now" uses too."""

from __future__ import annotations

import json
from typing import Any

from fleet_common.errors import FleetError


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """key=value pairs; values are JSON when they parse as JSON (limit=5 -> 5), else strings."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FleetError(f"--param {pair!r} must look like key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params
