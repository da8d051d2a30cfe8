"""`os_info`: host name, operating system, boot time, CPU count and logged-in users."""

from __future__ import annotations

import platform
import socket
import sys
import time

import psutil

from fleet_common.timefmt import iso

from .base import JsonObject, attempt, checked_params, register


def _users() -> list[JsonObject]:
    return [{"name": u.name, "terminal": u.terminal, "host": u.host,
             "started": iso(u.started) if u.started else None, "pid": getattr(u, "pid", None)}
            for u in psutil.users()]


def _distro() -> JsonObject | None:
    read = getattr(platform, "freedesktop_os_release", None)  # Python 3.10+, Linux
    if read is None:
        return None
    info = read()
    return {"id": info.get("ID"), "name": info.get("NAME"), "version_id": info.get("VERSION_ID"),
            "pretty_name": info.get("PRETTY_NAME")}


@register("os_info")
def collect(params: JsonObject) -> JsonObject:
    checked_params("os_info", params)
    boot = attempt(psutil.boot_time)
    return {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "release": platform.release(),
        "version": platform.version(),
        "platform": platform.platform(),
        "distro": attempt(_distro),
        "arch": platform.machine(),
        "boot_time": iso(boot) if boot else None,
        "uptime_s": round(time.time() - boot, 1) if boot else None,
        "cpu_count": psutil.cpu_count(),
        "cpu_count_physical": attempt(lambda: psutil.cpu_count(logical=False)),
        "python_version": platform.python_version(),
        "byteorder": sys.byteorder,
        "users": attempt(_users, []),
    }
