"""The agent's workarounds of paho-mqtt and psutil behaviour (fleet_agent.compat): each still
gives the right answer, and each test here fails when the upstream behaviour it works around
changes, saying what to do then."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet_agent import compat


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_paho_still_imports_dnspython_when_it_is_installed() -> None:
    """Upstream: paho.mqtt.client imports dns.resolver on import. If this fails, paho stopped
    doing so and compat.skip_dnspython can go."""
    if importlib.util.find_spec("dns") is None:
        pytest.skip("dnspython is not installed here")
    assert run_python("import sys, paho.mqtt.client as c; print(c.HAVE_DNS, 'dns.resolver' in sys.modules)") \
        == "True True"


def test_skip_dnspython_keeps_paho_working_without_it() -> None:
    """With the workaround applied, paho imports, makes a client, and has not loaded dnspython."""
    code = ("import sys; from fleet_agent import compat; compat.skip_dnspython(); "
            "import paho.mqtt.client as c; from paho.mqtt.enums import CallbackAPIVersion; "
            "c.Client(CallbackAPIVersion.VERSION2, protocol=c.MQTTv5); "
            "print(c.HAVE_DNS, any(m == 'dns' or m.startswith('dns.') for m, v in sys.modules.items() if v))")
    assert run_python(code) == "False False"


def test_the_agents_main_applies_the_workarounds() -> None:
    """fleet-agent's main() applies them (here through --once, which needs no broker)."""
    code = ("import sys, contextlib, io; from fleet_agent import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()): code = cli.main(['--once', 'ping'])\n"
            "print(code, 'dns' in sys.modules and sys.modules['dns'] is None)")
    assert run_python(code) == "0 True"


@pytest.fixture
def constructions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the psutil.Process objects made from now on (each reads the process's stat file)."""
    made: list[int] = []
    real = psutil.Process.__init__

    def counted(self: psutil.Process, *a: Any, **k: Any) -> None:
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(psutil.Process, "__init__", counted)
    yield made


def test_psutil_records_identity_as_pid_and_monotonic_start_time() -> None:
    """Upstream: psutil keeps a process's identity in `_ident` as (pid, monotonic start time) on
    Linux and macOS. If this fails, compat.pid_reused falls back to is_running(): rewrite it
    against what psutil does now."""
    if not sys.platform.startswith(("linux", "darwin")):
        pytest.skip("psutil uses the monotonic start time on Linux, macOS and NetBSD only")
    proc = psutil.Process()
    with proc.oneshot():
        assert proc._ident == (proc.pid, proc._proc.create_time(monotonic=True))
        assert compat.pid_reused(proc) is False
    pid, started = proc._ident
    proc._ident = (pid, started - 1000.0)  # what an earlier process with this pid would have had
    with proc.oneshot():
        assert compat.pid_reused(proc) is True


def test_psutil_is_running_still_makes_a_new_process(constructions: list[int]) -> None:
    """Upstream: Process.is_running() builds a new Process to compare identities. If this fails,
    it became cheap, and compat.pid_reused can simply call it."""
    proc = psutil.Process()
    constructions.clear()
    assert proc.is_running()
    assert constructions, "is_running() no longer makes a Process: use it in compat.pid_reused"
    constructions.clear()
    with proc.oneshot():
        assert compat.pid_reused(proc) is False
    assert constructions == []


def test_psutil_ppid_still_checks_for_pid_reuse(constructions: list[int]) -> None:
    """Upstream: Process.ppid() calls is_running() first (psutil 6.0 on). If this fails, it no
    longer does, and compat.ppid_unchecked can become proc.ppid()."""
    proc = psutil.Process()
    constructions.clear()
    assert proc.ppid() == os.getppid()
    assert constructions, "Process.ppid() no longer checks for pid reuse: use it in compat.ppid_unchecked"
    constructions.clear()
    assert compat.ppid_unchecked(proc) == os.getppid()
    assert constructions == []


def test_psutil_name_reads_the_command_line_for_a_15_character_name(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: Process.name() reads the command line when the kernel's name is 15 characters,
    and compat.stat_name does not (a kernel thread's name is its stat name). If this fails,
    psutil stopped doing so and compat.stat_name can become proc.name()."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's 15-character process names are Linux's")
    exe = tmp_path / "fleet-test-long-process-name"
    exe.symlink_to(shutil.which("sleep") or "/bin/sleep")
    child = subprocess.Popen([str(exe), "30"])
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 5
        while proc.name() != exe.name and time.monotonic() < deadline:
            time.sleep(0.02)  # until the child has exec'd
        reads: list[int] = []
        real = psutil.Process.cmdline
        monkeypatch.setattr(psutil.Process, "cmdline", lambda self: reads.append(1) or real(self))
        assert compat.stat_name(proc) == exe.name[:15] and reads == []
        assert proc.name() == exe.name and reads, "Process.name() no longer reads the command line"
    finally:
        child.kill()
        child.wait()
