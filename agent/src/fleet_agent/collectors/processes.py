"""`processes`: the top processes by CPU, memory, pid, name or start time, as a list.

Per-process cpu_percent is measured between two samples of the process's CPU time, so the
samples are kept by pid between requests (primed at agent start); a process first seen now
is primed and, if that was less than MIN_INTERVAL_S ago, the collector waits for the
remainder before measuring. A pid that now belongs to another process is found from the
same reads that give the row (its start time differs), and starts afresh.

On Linux the rows are read from /proc directly (ProcfsTable, see procfs); elsewhere through
psutil (ProcessTable). Both give the same fields with the same values.
"""

from __future__ import annotations

import pwd
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable

import psutil

from .. import compat
from . import procfs
from .base import JsonObject, checked_params, register

MIN_INTERVAL_S = 0.1
# sort key (fleet_common.datatypes.SORT_KEYS) -> descending?
SORTS: dict[str, bool] = {"cpu_percent": True, "rss": True, "create_time": True, "pid": False, "name": False}


class _Table:
    """What both readers of the process table share: priming, the wait for a fresh sample, and
    completing the rows at the head of the sorted list."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._primed_at = 0.0  # monotonic time of the newest priming

    def _refresh(self) -> Any:
        raise NotImplementedError

    def prime(self) -> None:
        with self._lock:
            self._refresh()

    def snapshot(self) -> list[JsonObject]:
        """Every process's row, in no particular order."""
        return self.top(None, None)[0]

    def top(self, sort_by: str | None, limit: int | None) -> tuple[list[JsonObject], int]:
        raise NotImplementedError

    def _wait_for_primed(self) -> None:
        """A process primed less than min_interval_s ago gets the rest of it before it is measured."""
        wait = self.min_interval_s - (time.monotonic() - self._primed_at)
        if wait > 0:
            time.sleep(wait)

    def _head(self, rows: list[JsonObject], sort_by: str | None, limit: int | None) -> list[JsonObject]:
        out: list[JsonObject] = []
        for row in sort_rows(rows, sort_by) if sort_by is not None else rows:
            if limit is not None and len(out) >= limit:
                break
            full = self._complete(row)
            if full is not None:  # it ended meanwhile: the next one takes its place
                out.append(full)
        return out

    @staticmethod
    def _complete(row: JsonObject) -> JsonObject | None:
        raise NotImplementedError


class ProcessTable(_Table):
    """psutil.Process objects cached by pid, each with its previous CPU time sample (systems
    without Linux's /proc).

    cpu_percent is psutil's formula, 100 x (CPU seconds used) / (seconds elapsed) between two
    samples, computed here from the cpu_times() that oneshot() reads with the rest of the row:
    Process.cpu_percent() also asks the system for the CPU count (sysconf) on every call, once
    per process, and was the largest single cost of a snapshot."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S) -> None:
        super().__init__(min_interval_s)
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (user + system seconds, monotonic time)

    def _refresh(self) -> None:
        live = set(psutil.pids())
        for pid in list(self._procs):
            if pid not in live:
                self._forget(pid)
        for pid in live - self._procs.keys():
            self._add(pid)

    def _forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._cpu.pop(pid, None)

    def _add(self, pid: int) -> psutil.Process | None:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
        except psutil.Error:
            self._forget(pid)
            return None
        self._procs[pid] = proc
        self._primed_at = time.monotonic()
        self._cpu[pid] = (times.user + times.system, self._primed_at)
        return proc

    def top(self, sort_by: str | None, limit: int | None) -> tuple[list[JsonObject], int]:
        """The first `limit` rows in `sort_by` order (see sort_rows), and how many processes there are.

        Every process's sort key and what its stat file gives are read first; its user, threads,
        memory and name (the status, statm and often cmdline files) only if its row is returned:
        most of a snapshot's cost, and a host has far more processes than the default 50. Each
        process's psutil oneshot() stays open from the first read to the last, so its stat file
        is read once."""
        with self._lock, ExitStack() as held:
            self._refresh()
            self._wait_for_primed()
            rows = []
            for pid, proc in list(self._procs.items()):
                try:
                    row = self._measure(held, pid, proc, sort_by)
                except _Reused:
                    fresh = self._add(pid)  # its CPU share is unknown until the next request
                    row = self._measure(held, pid, fresh, sort_by, cpu=False) if fresh is not None else None
                if row is None:
                    self._forget(pid)
                else:
                    rows.append(row)
            return self._head(rows, sort_by, limit), len(rows)

    def _cpu_percent(self, pid: int, proc: psutil.Process) -> float | None:
        times = proc.cpu_times()
        now, used = time.monotonic(), float(times.user + times.system)
        before = self._cpu.get(pid)
        self._cpu[pid] = (used, now)
        if before is None or now <= before[1]:
            return None
        return round(max(0.0, used - before[0]) * 100.0 / (now - before[1]), 1)

    def _measure(self, held: ExitStack, pid: int, proc: psutil.Process, sort_by: str | None, cpu: bool = True
                 ) -> JsonObject | None:
        """What /proc/<pid>/stat gives, for every process (it keeps each CPU share current), plus
        the sort key. Leaves the process's oneshot() open in `held`."""
        try:
            held.enter_context(proc.oneshot())
            if cpu and compat.pid_reused(proc):
                raise _Reused(pid)
            row: JsonObject = {
                "pid": pid,
                "ppid": _field(lambda: compat.ppid_unchecked(proc)),  # pid reuse checked above
                "status": _field(proc.status),
                "cpu_percent": _field(lambda: self._cpu_percent(pid, proc)) if cpu else None,
                "create_time": _field(proc.create_time),
                "_proc": proc,
            }
            if sort_by == "rss":
                row["rss"] = _rss(proc)
            elif sort_by == "name":
                row["name"] = _name(proc, row["ppid"])
            return row
        except psutil.NoSuchProcess:
            return None

    @staticmethod
    def _complete(row: JsonObject) -> JsonObject | None:
        """The rest of a row that will be returned; None if the process has ended since."""
        proc = row["_proc"]
        try:
            name = row["name"] if "name" in row else _name(proc, row["ppid"])
            rss = row["rss"] if "rss" in row else _rss(proc)
            return {"pid": row["pid"], "ppid": row["ppid"], "name": name, "username": _username(proc),
                    "status": row["status"], "cpu_percent": row["cpu_percent"], "rss": rss,
                    "create_time": row["create_time"], "num_threads": _field(proc.num_threads)}
        except psutil.NoSuchProcess:
            return None


def _rss(proc: psutil.Process) -> Any:
    mem = _field(proc.memory_info)
    return mem.rss if mem is not None else None


def _field(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except psutil.NoSuchProcess:
        raise
    except (psutil.AccessDenied, psutil.ZombieProcess, OSError, NotImplementedError):
        return None


class _Reused(Exception):
    """The pid now belongs to a process other than the one we measured before."""


KTHREADD = 2  # Linux: the parent of every kernel thread
_kthreadd_seen: list[bool] = []  # [is pid 2 the kernel's kthreadd?], found once


def _kernel_threads_visible() -> bool:
    """Pid 2 is kthreadd on a Linux host; in a container's own pid namespace it is any process."""
    if not _kthreadd_seen:
        try:
            _kthreadd_seen.append(sys.platform.startswith("linux") and psutil.Process(KTHREADD).name() == "kthreadd")
        except psutil.Error:
            _kthreadd_seen.append(False)
    return _kthreadd_seen[0]


def _name(proc: psutil.Process, ppid: Any) -> Any:
    """Process.name(), which reads the command line when the name is 15 characters (the kernel's
    limit) in case it holds a longer one. A kernel thread has no command line, and psutil then
    reads the stat file again to tell it from a zombie: about a fifth of a snapshot's reads here."""
    if KTHREADD in (ppid, proc.pid) and _kernel_threads_visible():
        return _field(lambda: compat.stat_name(proc))
    return _field(proc.name)


_USERS: dict[int, str] = {}  # uid -> user name: one passwd lookup per uid, not per process per request


def _username(proc: psutil.Process) -> str | None:
    uid = _field(lambda: proc.uids().real)
    if uid is None:  # not POSIX
        found = _field(proc.username)
        return None if found is None else str(found)
    return _user_name(uid)


def _user_name(uid: int) -> str:
    name = _USERS.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)  # as psutil says it
        if len(_USERS) > 4096:
            _USERS.clear()
        _USERS[uid] = name
    return name


class ProcfsTable(_Table):
    """ProcessTable's rows on Linux, read from /proc directly (see procfs): each process's stat
    file once per request, its status file (and, for a name the kernel cut, its command line)
    only if its row is returned. Same fields, same values, three fifths of the CPU."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S) -> None:
        super().__init__(min_interval_s)
        # pid -> (start ticks, user + system seconds, monotonic time) of its previous sample
        self._cpu: dict[int, tuple[int, float, float]] = {}

    def _refresh(self) -> list[int]:
        pids: list[int] = psutil.pids()
        live = set(pids)
        for pid in [p for p in self._cpu if p not in live]:
            del self._cpu[pid]
        for pid in pids:
            if pid not in self._cpu:
                st = procfs.stat(pid)
                if st is not None:
                    self._primed_at = time.monotonic()
                    self._cpu[pid] = (st.start_ticks, st.cpu_s, self._primed_at)
        return pids

    def top(self, sort_by: str | None, limit: int | None) -> tuple[list[JsonObject], int]:
        with self._lock:
            pids = self._refresh()
            self._wait_for_primed()
            boot = psutil.boot_time()
            rows = []
            for pid in pids:
                st = procfs.stat(pid)
                if st is None:  # ended
                    self._cpu.pop(pid, None)
                    continue
                now = time.monotonic()
                before = self._cpu.get(pid)
                self._cpu[pid] = (st.start_ticks, st.cpu_s, now)
                cpu = None
                if before is not None and before[0] == st.start_ticks and now > before[2]:
                    cpu = round(max(0.0, st.cpu_s - before[1]) * 100.0 / (now - before[2]), 1)
                # else the pid now belongs to another process: its CPU share waits for the next request
                row: JsonObject = {"pid": pid, "ppid": st.ppid, "status": st.status, "cpu_percent": cpu,
                                   "create_time": st.start_ticks / procfs.CLOCK_TICKS + boot, "_stat": st}
                if sort_by == "rss":
                    row["rss"] = procfs.rss(pid)
                elif sort_by == "name":
                    row["name"] = procfs.name(pid, st.comm)
                rows.append(row)
            return self._head(rows, sort_by, limit), len(rows)

    @staticmethod
    def _complete(row: JsonObject) -> JsonObject | None:
        pid, st = row["pid"], row["_stat"]
        found = procfs.status(pid)
        if found is None:
            return None
        uid, rss = found
        rss = row["rss"] if "rss" in row else rss  # the figure the rows were sorted by
        name = row["name"] if "name" in row else procfs.name(pid, st.comm)
        return {"pid": pid, "ppid": row["ppid"], "name": name,
                "username": _user_name(uid) if uid is not None else None, "status": row["status"],
                "cpu_percent": row["cpu_percent"], "rss": rss, "create_time": row["create_time"],
                "num_threads": st.threads}


TABLE = ProcfsTable() if procfs.available() else ProcessTable()


def sort_rows(rows: list[JsonObject], sort_by: str) -> list[JsonObject]:
    """Sort by `sort_by` (numbers high first, except pid; names A-Z), missing values last."""
    descending = SORTS[sort_by]
    present = [r for r in rows if r.get(sort_by) is not None]
    missing = [r for r in rows if r.get(sort_by) is None]
    if sort_by == "name":
        present.sort(key=lambda r: (str(r["name"]).lower(), r["pid"]))
    else:
        present.sort(key=lambda r: (-r[sort_by] if descending else r[sort_by], r["pid"]))
    return present + sorted(missing, key=lambda r: r["pid"])


@register("processes", prime=TABLE.prime)
def collect(params: JsonObject) -> JsonObject:
    checked = checked_params("processes", params)
    limit, sort_by = checked["limit"], checked["sort_by"]
    rows, total = TABLE.top(sort_by, limit)
    return {"processes": rows, "total": total, "sort_by": sort_by, "limit": limit}
