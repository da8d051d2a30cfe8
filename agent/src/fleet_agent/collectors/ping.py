"""`ping`: an empty answer; the requester measures liveness and round trip."""

from __future__ import annotations

from .base import JsonObject, checked_params, register


@register("ping")
def collect(params: JsonObject) -> JsonObject:
    checked_params("ping", params)
    return {}
