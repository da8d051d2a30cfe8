"""Every place the agent works around how paho-mqtt or psutil behave, in one module.

Each workaround says which upstream behaviour it exists for, and tests/test_agent_compat.py
has a test that fails when that behaviour changes, so a new release that makes one
unnecessary (or breaks it) is noticed rather than carried along. Nothing here runs on
import: `apply()` is called from the agent's main(); the psutil helpers are called where
the process collector needs them.
"""

from __future__ import annotations

import sys
from typing import Any

import psutil


def apply() -> None:
    """The process-wide workarounds, for `fleet-agent` serving: call before paho is imported."""
    skip_dnspython()


def skip_dnspython() -> None:
    """paho-mqtt 2.x runs `import dns.resolver` when paho.mqtt.client is imported, if dnspython
    is installed (pymongo pulls it in on shared machines), for Client.connect_srv(), which the
    agent never calls. A None in sys.modules makes that import fail as if dnspython were absent:
    about 8 MB of resident memory saved. No effect once dnspython is loaded."""
    sys.modules.setdefault("dns", None)  # type: ignore[arg-type]


# psutil: the process collector reads every process's row inside Process.oneshot(), where each
# /proc/<pid>/stat read is shared by all the fields taken from it. Three public calls read it
# again, or a command line besides; these give the same answers from what oneshot() has read.
# Where psutil's private attributes are not there (another platform or release), each falls back
# to the public call: slower, never wrong.


def pid_reused(proc: psutil.Process) -> bool:
    """Inside proc.oneshot(): does proc's pid now belong to another process?

    psutil's public check, Process.is_running(), builds a new Process, which reads the stat file
    again. psutil records a process's identity when it makes the Process, in the private `_ident`:
    (pid, `_proc.create_time(monotonic=True)`) on Linux, macOS and NetBSD; inside oneshot() that
    start time comes from the stat data already read."""
    try:
        return bool(proc._ident != (proc.pid, proc._proc.create_time(monotonic=True)))
    except (AttributeError, TypeError):
        return not proc.is_running()


def ppid_unchecked(proc: psutil.Process) -> Any:
    """The parent pid, for a process already checked with pid_reused().

    Process.ppid() (psutil 6.0 and later) first calls is_running(), a new Process again; the
    platform implementation `_proc.ppid()` reads the parent from the stat data."""
    try:
        return proc._proc.ppid()
    except AttributeError:
        return proc.ppid()


def stat_name(proc: psutil.Process) -> Any:
    """The kernel's name for the process (cut to 15 characters), for kernel threads.

    Process.name() reads the command line when the name is 15 characters long, in case it holds
    a longer one; a kernel thread has none, and psutil then reads the stat file again to tell it
    from a zombie. A kernel thread's name is its stat name, so `_proc.name()` gives it."""
    impl = getattr(proc, "_proc", None)
    if impl is None or not hasattr(impl, "name"):
        return proc.name()
    return impl.name()


__all__ = ["apply", "pid_reused", "ppid_unchecked", "skip_dnspython", "stat_name"]
