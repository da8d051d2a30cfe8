"""A read-only web dashboard for the fleet, over the store the persister writes."""

from .app import create_app
from .cli import serve

__all__ = ["create_app", "serve"]
