"""Heartbeat files and the `--check` health command every service shares.

A running service rewrites a small JSON file every `heartbeat_interval_s`:

    {"service": "fleet-persister", "pid": 42, "ts": "2026-11-26T04:30:00.123Z",
     "ts_s": 1795667400.123, "interval_s": 5.0, "ready": true, "problems": [], "counters": {...}}

`ready` (controller and persister) turns true once the broker has acknowledged the service's
subscriptions (SUBACK), and false again when the connection is lost; the file is rewritten at
once when it changes, so `wait_ready()` (fleetctl up, the tests) waits on that event rather than
on log lines or sleeps.

`<command> --check` reads it and exits 0 when it is fresh (written within
STALE_AFTER_INTERVALS intervals) and names no problems, else 1, printing one line
either way. Compose health checks, systemd and monitoring scripts use that exit code.
The file is removed on a clean stop, so a stopped service reads as "not running".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from .timefmt import iso

STALE_AFTER_INTERVALS = 3

Snapshot = Callable[[], Mapping[str, Any]]
Problems = Callable[[], list[str]]

log = logging.getLogger("fleet.health")


def add_check_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if the running service's heartbeat is fresh and healthy, else 1")


class Readiness:
    """Whether a service does its work yet (its subscriptions acknowledged). Set and cleared from
    the network thread; each change is told to the listeners (a Heartbeat writes its file at once)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._listeners: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, ready: bool = True) -> None:
        if ready == self._event.is_set():
            return
        if ready:
            self._event.set()
        else:
            self._event.clear()
        for listener in list(self._listeners):
            listener()

    def clear(self) -> None:
        self.set(False)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._event.wait(timeout_s)

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)


class Heartbeat:
    """Writes the heartbeat file every `interval_s`, and at once when `ready` changes, on a named
    daemon thread; a context manager."""

    def __init__(self, path: str, service: str, interval_s: float, counters: Snapshot,
                 problems: Problems | None = None, ready: Readiness | None = None) -> None:
        self.path = Path(path).expanduser()
        self.service, self.interval_s = service, max(interval_s, 0.05)
        self._counters, self._problems, self._ready = counters, problems or (lambda: []), ready
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        if ready is not None:
            ready.listen(self._wake.set)

    def payload(self, now_s: float | None = None) -> dict[str, Any]:
        now_s = time.time() if now_s is None else now_s
        beat = {"service": self.service, "pid": os.getpid(), "ts": iso(now_s), "ts_s": round(now_s, 3),
                "interval_s": self.interval_s, "problems": list(self._problems()),
                "counters": dict(self._counters())}
        if self._ready is not None:
            beat["ready"] = self._ready.is_set()
        return beat

    def beat(self) -> None:
        """Write the file once, atomically (a temporary file renamed over it), so --check never reads half."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.payload(), default=str, sort_keys=True)
            fd, tmp = tempfile.mkstemp(prefix=".heartbeat-", dir=str(self.path.parent))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except Exception as exc:  # a full disk must not stop the service; --check will say "stale"
            if not self._failing:
                log.warning("cannot write heartbeat %s (%s: %s); health checks will fail", self.path,
                            type(exc).__name__, exc)
            self._failing = True
            return
        if self._failing:
            log.info("heartbeat %s is written again", self.path)
        self._failing = False

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"{self.service}-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        try:
            self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.beat()


def check(path: str, now_s: float | None = None) -> tuple[int, str]:
    """(0, why) if the heartbeat at `path` is fresh and names no problems, else (1, why)."""
    file = Path(path).expanduser()
    now_s = time.time() if now_s is None else now_s
    try:
        beat = json.loads(file.read_text(encoding="utf-8"))
        ts_s, interval_s = float(beat["ts_s"]), float(beat["interval_s"])
        problems = [str(p) for p in beat.get("problems") or []]
    except FileNotFoundError:
        return 1, f"no heartbeat at {file}: the service is not running (or uses another heartbeat_path)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return 1, f"unreadable heartbeat at {file}: {type(exc).__name__}: {exc}"
    age_s = now_s - ts_s
    if age_s > STALE_AFTER_INTERVALS * interval_s:
        return 1, (f"stale heartbeat at {file}: written {age_s:.0f} s ago, expected every {interval_s:g} s "
                   f"(pid {beat.get('pid')} hung or gone)")
    if problems:
        return 1, "unhealthy: " + "; ".join(problems)
    return 0, f"healthy: heartbeat {max(age_s, 0.0):.1f} s old (pid {beat.get('pid')})"


def read_beat(path: str) -> dict[str, Any] | None:
    """The heartbeat at `path`, or None if there is none (yet) or it cannot be read."""
    try:
        beat = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def wait_ready(path: str, pid: int, timeout_s: float, alive: Callable[[], bool] = lambda: True,
               poll_s: float = 0.05) -> bool:
    """Wait until the heartbeat at `path`, written by process `pid` (not a stale file from an earlier
    run), says `ready`; False after `timeout_s`, or as soon as `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while True:
        beat = read_beat(path)
        if beat is not None and beat.get("pid") == pid and beat.get("ready") is True:
            return True
        if time.monotonic() >= deadline or not alive():
            return False
        time.sleep(poll_s)


def run_check(path: str, prog: str) -> int:
    """The body of `<prog> --check`: one line on stdout, exit code 0 or 1."""
    code, why = check(path)
    print(f"{prog}: {why}")
    return code


__all__ = ["STALE_AFTER_INTERVALS", "Heartbeat", "Readiness", "add_check_argument", "check", "read_beat",
           "run_check", "wait_ready"]
