"""`cpu`: utilisation since the previous request, load average, frequency, context switches.

psutil.cpu_percent(interval=None) keeps its previous sample per thread and returns a
meaningless 0.0 the first time a thread calls it; the agent's worker threads come and
go, so this module keeps its own previous sample, shared by all threads: primed when the
agent starts, and if it is less than MIN_INTERVAL_S old, topped up by waiting.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import psutil

from .base import JsonObject, attempt, checked_params, register

MIN_INTERVAL_S = 0.1
_LINUX = sys.platform.startswith("linux")


def _total(times: Any) -> float:
    tot = float(sum(times))
    if _LINUX:  # guest time is already counted in user/nice
        tot -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return tot


def _delta(t1: Any, t2: Any) -> Any:
    # CPU time counters occasionally go backwards; clamp like psutil and top do.
    return type(t2)(*(max(0.0, b - a) for a, b in zip(t1, t2)))


def _busy_percent(t1: Any, t2: Any) -> float:
    d = _delta(t1, t2)
    total = _total(d)
    if total <= 0:
        return 0.0
    busy = total - d.idle - getattr(d, "iowait", 0.0)
    return round(min(100.0, max(0.0, float(busy) * 100.0 / total)), 1)


def _fields_percent(t1: Any, t2: Any) -> JsonObject:
    d = _delta(t1, t2)
    scale = 100.0 / max(_total(d), 1e-9)
    return {name: round(min(100.0, value * scale), 1) for name, value in d._asdict().items()}


Sample = tuple[float, Any, list[Any]]


class CpuSampler:
    """Thread-safe CPU utilisation between successive samples."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._last: Sample | None = None

    @staticmethod
    def _take() -> Sample:
        return time.monotonic(), psutil.cpu_times(), psutil.cpu_times(percpu=True)

    def prime(self) -> None:
        with self._lock:
            if self._last is None:
                self._last = self._take()

    def sample(self) -> JsonObject:
        """percent, per_cpu, times_percent and the interval they cover (at least min_interval_s)."""
        with self._lock:
            if self._last is None:
                self._last = self._take()
            wait = self.min_interval_s - (time.monotonic() - self._last[0])
            if wait > 0:
                time.sleep(wait)
            then, total1, per1 = self._last
            now, total2, per2 = self._last = self._take()
        per_cpu = [_busy_percent(a, b) for a, b in zip(per1, per2)] if len(per1) == len(per2) else None
        return {
            "percent": _busy_percent(total1, total2),
            "per_cpu": per_cpu,
            "times_percent": _fields_percent(total1, total2),
            "interval_s": round(now - then, 3),
        }


SAMPLER = CpuSampler()


def _freq() -> JsonObject | None:
    f = psutil.cpu_freq()
    if f is None:
        return None
    return {"current": f.current, "min": f.min or None, "max": f.max or None}


def _load_avg() -> list[float] | None:
    return [round(x, 2) for x in psutil.getloadavg()]


@register("cpu", prime=SAMPLER.prime)
def collect(params: JsonObject) -> JsonObject:
    checked_params("cpu", params)
    data = SAMPLER.sample()
    stats = attempt(psutil.cpu_stats, {}) or {}
    data.update(
        count=psutil.cpu_count(),
        count_physical=attempt(lambda: psutil.cpu_count(logical=False)),
        load_avg=attempt(_load_avg),
        freq_mhz=attempt(_freq),
        ctx_switches=stats.get("ctx_switches"),
        interrupts=stats.get("interrupts"),
    )
    return data
