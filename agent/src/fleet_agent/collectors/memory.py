"""`memory`: virtual memory and swap, in bytes (percent in %)."""

from __future__ import annotations

import psutil

from .base import JsonObject, attempt, check_params, register


@register("memory")
def collect(params: JsonObject) -> JsonObject:
    check_params(params)
    return {"virtual": attempt(psutil.virtual_memory), "swap": attempt(psutil.swap_memory)}
