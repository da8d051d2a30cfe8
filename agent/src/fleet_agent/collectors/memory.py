"""`memory`: virtual memory and swap, in bytes (percent in %)."""

from __future__ import annotations

import psutil

from .base import JsonObject, attempt, checked_params, jsonable, register


@register("memory")
def collect(params: JsonObject) -> JsonObject:
    checked_params("memory", params)
    # no virtual memory figures is a failed collection, not an answer; swap may be missing
    return {"virtual": jsonable(psutil.virtual_memory()), "swap": attempt(psutil.swap_memory)}
