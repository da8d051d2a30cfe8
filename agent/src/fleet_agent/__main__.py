"""`python -m fleet_agent` is `fleet-agent`."""

from .cli import entry

entry()
