"""`disk`: mounted partitions with usage (a list, never keyed by mount point) and I/O counters."""

from __future__ import annotations

import psutil

from .base import JsonObject, attempt, checked_params, jsonable, register


def _partitions() -> list[JsonObject]:
    out: list[JsonObject] = []
    for part in psutil.disk_partitions(all=False):
        entry: JsonObject = {"device": part.device, "mountpoint": part.mountpoint, "fstype": part.fstype,
                             "opts": part.opts, "total": None, "used": None, "free": None, "percent": None}
        try:
            entry.update(jsonable(psutil.disk_usage(part.mountpoint)))
        except Exception:  # PermissionError, an empty CD drive, a vanished mount
            pass
        out.append(entry)
    return out


def _per_disk() -> list[JsonObject]:
    counters = psutil.disk_io_counters(perdisk=True) or {}
    return [{"name": name, **jsonable(c)} for name, c in sorted(counters.items())]


@register("disk")
def collect(params: JsonObject) -> JsonObject:
    checked_params("disk", params)
    return {
        "partitions": attempt(_partitions, []),
        "io": attempt(lambda: psutil.disk_io_counters(perdisk=False)),
        "io_per_disk": attempt(_per_disk, []),
    }
