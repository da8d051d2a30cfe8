"""The agent's built-in collectors: contract shapes, JSON safety, params, and real CPU percentages."""

from __future__ import annotations

import collections
import enum
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet_agent.collectors import BUILTIN, REGISTRY, BadParams, jsonable, procfs
from fleet_agent.collectors.cpu import CpuSampler
from fleet_agent.collectors.processes import TABLE, ProcessTable, ProcfsTable
from fleet_common.config import BUILTIN_TYPES
from fleet_common.datatypes import BUILTIN as DATATYPES
from fleet_common.messages import check_document

try:  # the persister's fast check too, where it is installed
    from fleet_persister.datacheck import check_data
except ImportError:  # the agent alone (CI's Windows and macOS jobs): the reference check only
    check_data = None

NO_PROC = not procfs.available()
# both ways of reading the process table: through psutil (every platform) and /proc (Linux)
TABLES = [ProcessTable, pytest.param(ProcfsTable, marks=pytest.mark.skipif(NO_PROC, reason="no Linux /proc here"))]

# type -> keys the design table promises in its data
def _dict_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _dict_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dict_keys(item)


def _host_names() -> set[str]:
    """Names that come from this host: mount points, devices, NICs, process names."""
    names = {p.mountpoint for p in psutil.disk_partitions()} | {p.device for p in psutil.disk_partitions()}
    names |= set(psutil.net_if_addrs()) | set(psutil.net_io_counters(pernic=True))
    names |= set(psutil.disk_io_counters(perdisk=True) or {})
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"]:
            names.add(proc.info["name"])
    return names


def test_registry_holds_the_builtin_types() -> None:
    """Every type the design lists is registered, under the names the shared config knows."""
    assert set(BUILTIN) == set(BUILTIN_TYPES) <= set(REGISTRY)


@pytest.mark.parametrize("type_", sorted(DATATYPES))
def test_collector_returns_contract_shape_as_plain_json(type_: str) -> None:
    """Each collector gives its type's data as fleet_common.datatypes defines it (what the persister
    checks), strict JSON (no NaN) that a document store accepts."""
    data = REGISTRY[type_]({})
    assert isinstance(data, dict)
    size = len(json.dumps(data).encode())
    DATATYPES[type_].check_data(data, size)
    if check_data is not None:
        check_data(type_, data, size)
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # nothing but plain JSON types
    check_document(data)  # no '$x' or 'a.b' keys, depth bounded


def test_collections_are_lists_not_maps_keyed_by_host_names() -> None:
    """No output uses a mount point, device, NIC or process name as an object key."""
    host = _host_names()
    for type_ in BUILTIN:
        keys = set(_dict_keys(REGISTRY[type_]({})))
        assert not keys & host, f"{type_} keys data by host names: {sorted(keys & host)[:5]}"
    disk, net = REGISTRY["disk"]({}), REGISTRY["network"]({})
    assert isinstance(disk["partitions"], list) and all("mountpoint" in p for p in disk["partitions"])
    assert isinstance(net["interfaces"], list) and net["interfaces"]
    assert all({"name", "bytes_sent", "bytes_recv", "errin", "dropout"} <= set(n) for n in net["interfaces"])


@pytest.mark.parametrize("type_", [t for t in BUILTIN if t != "processes"])
def test_collectors_reject_unknown_params(type_: str) -> None:
    """A param a collector does not know is a bad request, not silently ignored."""
    with pytest.raises(BadParams):
        REGISTRY[type_]({"bogus": 1})


def test_processes_limit_and_sort_by() -> None:
    """limit caps the list; sort_by orders by rss (high first), pid (low first) and name (A-Z)."""
    collect = REGISTRY["processes"]
    data = collect({"limit": 3, "sort_by": "rss"})
    rows = data["processes"]
    assert len(rows) == 3 and data["total"] >= 3
    assert {"pid", "ppid", "name", "username", "status", "cpu_percent", "rss", "create_time"} <= set(rows[0])
    rss = [r["rss"] for r in rows]
    assert rss == sorted(rss, reverse=True)
    by_pid = [r["pid"] for r in collect({"limit": 20, "sort_by": "pid"})["processes"]]
    assert by_pid == sorted(by_pid)
    names = [r["name"].lower() for r in collect({"limit": 20, "sort_by": "name"})["processes"] if r["name"]]
    assert names == sorted(names)
    cpu = [r["cpu_percent"] for r in collect({})["processes"] if r["cpu_percent"] is not None]
    assert cpu == sorted(cpu, reverse=True)
    assert any(r["pid"] == os.getpid() for r in collect({"limit": 10000, "sort_by": "pid"})["processes"])


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 10001}, {"limit": "5"}, {"limit": True},
                                    {"limit": 1.5}, {"sort_by": "memory"}, {"sort_by": None}, {"top": 5},
                                    {"sort_by": ["rss"]}, {"sort_by": {"rss": 1}}])
def test_processes_rejects_bad_params(params: dict) -> None:
    """Out-of-range limits, unknown sort keys and unknown params raise BadParams."""
    with pytest.raises(BadParams):
        REGISTRY["processes"](params)


def test_jsonable_makes_psutil_values_plain() -> None:
    """Namedtuples become objects, NaN and infinity become null, enums their names, tuples lists."""
    Pair = collections.namedtuple("Pair", "a b")

    class Colour(enum.IntEnum):
        RED = 1

    assert jsonable({"p": Pair(1.0, float("nan")), "t": (1, float("inf")), "c": Colour.RED}) == \
        {"p": {"a": 1.0, "b": None}, "t": [1, None], "c": "RED"}


def test_cpu_first_sample_is_a_real_measurement() -> None:
    """A sampler never primed still measures over >= 0.1 s: field percentages add up to 100, not the
    all-zero 'first call' reading, and there is one per_cpu entry per logical CPU."""
    sampler = CpuSampler()
    data = sampler.sample()
    assert data["interval_s"] >= sampler.min_interval_s * 0.99
    fields = {k: v for k, v in data["times_percent"].items() if k not in ("guest", "guest_nice")}
    assert 95.0 <= sum(fields.values()) <= 105.0, data["times_percent"]
    assert len(data["per_cpu"]) == psutil.cpu_count()
    assert 0.0 <= data["percent"] <= 100.0


def test_cpu_sample_right_after_priming_waits_for_the_minimum_interval() -> None:
    """Priming then sampling at once still covers the minimum interval and sees a busy thread's load."""
    sampler = CpuSampler(min_interval_s=0.2)
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        sampler.prime()
        data = sampler.sample()
    finally:
        done.set()
        spinner.join()
    assert data["interval_s"] >= 0.2 * 0.99
    assert data["percent"] > 0.0, data  # one CPU was busy all along: a real reading cannot be 0


@pytest.mark.parametrize("table_type", TABLES)
def test_process_cpu_percent_is_measured_on_first_snapshot(table_type: Any) -> None:
    """A fresh process table primes each process and waits, so a busy process shows cpu_percent > 0
    on the very first snapshot (psutil's first per-process reading is always 0.0)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        rows = table_type(min_interval_s=0.2).snapshot()
    finally:
        spinner.kill()
        spinner.wait()
    busy = next(r for r in rows if r["pid"] == spinner.pid)
    assert busy["cpu_percent"] is not None and busy["cpu_percent"] > 0.0, busy
    assert busy["rss"] > 0 and busy["name"] and busy["ppid"] == os.getpid()


def test_a_reused_pid_is_measured_afresh() -> None:
    """When a pid the table knows now belongs to another process (psutil tells them apart by start
    time), the row describes the new process and gives no CPU share rather than one computed
    against the old process's times; the next snapshot measures it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        table = ProcessTable(min_interval_s=0.0)
        table.prime()
        old = table._procs[child.pid]
        pid, started = old._ident
        old._ident = (pid, started - 1000.0)  # what an earlier process with this pid would have had
        row = next(r for r in table.snapshot() if r["pid"] == child.pid)
        assert row["cpu_percent"] is None and row["ppid"] == os.getpid()
        assert table._procs[child.pid] is not old, "a new psutil.Process replaces the stale one"
        again = next(r for r in table.snapshot() if r["pid"] == child.pid)
        assert again["cpu_percent"] is not None
    finally:
        child.kill()
        child.wait()


def _proc_reads(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts the /proc files psutil opens, by file name (stat, status, statm, cmdline)."""
    from psutil import _pslinux

    if not sys.platform.startswith("linux") or not hasattr(_pslinux, "open_binary"):
        pytest.skip("counts psutil's /proc reads, which exist on Linux only")
    reads: collections.Counter[str] = collections.Counter()
    for name in ("open_binary", "open_text"):
        real = getattr(_pslinux, name)

        def counted(path: str, *a: Any, _real: Any = real, **k: Any) -> Any:
            reads[str(path).rsplit("/", 1)[-1]] += 1
            return _real(path, *a, **k)

        monkeypatch.setattr(_pslinux, name, counted)
    return reads


def test_processes_reads_the_rest_of_a_row_only_for_rows_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process's stat file is read once (its CPU share and the sort key); its status and
    statm files only for the `limit` rows returned. Before, a default request read all four
    files for every process."""
    table = ProcessTable(min_interval_s=0.0)
    table.prime()
    reads = _proc_reads(monkeypatch)
    rows, total = table.top("cpu_percent", 3)
    assert len(rows) == 3 and total >= 10
    assert reads["stat"] <= total + 2  # + processes that started meanwhile
    assert reads["status"] <= 3 and reads["statm"] <= 3, reads
    reads.clear()
    rows, total = table.top("rss", 3)
    assert reads["statm"] >= total - 2 and reads["status"] <= 3, reads  # rss is the sort key: read for all
    assert [r["rss"] for r in rows] == sorted((r["rss"] for r in rows), reverse=True)


@pytest.mark.parametrize("table_type", TABLES)
def test_processes_top_is_the_head_of_the_whole_list(table_type: Any) -> None:
    """top(sort_by, n) gives the rows the whole sorted list starts with (pid and name orders are
    stable between two calls; CPU and memory figures move), each with every field."""
    table = table_type(min_interval_s=0.0)
    table.prime()
    for sort_by in ("pid", "name"):
        head, total = table.top(sort_by, 5)
        whole, _ = table.top(sort_by, None)
        assert [r["pid"] for r in head] == [r["pid"] for r in whole[:5]]
        assert abs(total - len(whole)) <= 2
    fields = ["pid", "ppid", "name", "username", "status", "cpu_percent", "rss", "create_time", "num_threads"]
    assert all(list(r) == fields for r in table.snapshot())


@pytest.mark.parametrize("table_type", TABLES)
def test_kernel_threads_are_named_as_psutil_names_them(table_type: Any) -> None:
    """Kernel threads skip psutil's command-line read (they have none); the name is the same.
    A kworker's name says what it works on, and changes: those psutil names alike just before
    and just after the snapshot are compared."""

    def names() -> dict[int, str]:
        found = {}
        for proc in psutil.process_iter(["name"]):
            found[proc.pid] = proc.info["name"]
        return found

    before = names()
    rows = table_type(min_interval_s=0.0).snapshot()
    after = names()
    kernel = [r for r in rows if (r["ppid"] == 2 or r["pid"] == 2) and r["pid"] in after
              and before.get(r["pid"]) == after[r["pid"]]]
    if not kernel:
        pytest.skip("no kernel threads are visible here (not Linux, or a container's own pid namespace)")
    assert [r["name"] for r in kernel] == [after[r["pid"]] for r in kernel]


def test_only_the_real_kthreadd_makes_a_kernel_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container's pid namespace pid 2 is an ordinary process: its children keep the long
    name psutil finds in their command line. On a host, a child of kthreadd is named from stat."""
    from fleet_agent.collectors import processes

    if not sys.platform.startswith("linux"):
        pytest.skip("kernel threads and 15-character process names are Linux's")
    exe = tmp_path / "fleet-test-long-process-name"
    exe.symlink_to(shutil.which("sleep") or "/bin/sleep")
    child = subprocess.Popen([str(exe), "30"])
    try:
        proc = psutil.Process(child.pid)
        wait_until_named = time.monotonic() + 5
        while proc.name() != exe.name and time.monotonic() < wait_until_named:
            time.sleep(0.02)
        assert proc.name() == exe.name  # psutil extends the 15-character name from the command line
        monkeypatch.setattr(processes, "_kthreadd_seen", [False])
        assert processes._name(proc, processes.KTHREADD) == exe.name
        monkeypatch.setattr(processes, "_kthreadd_seen", [True])
        assert processes._name(proc, processes.KTHREADD) == exe.name[:15]
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(NO_PROC, reason="reads Linux's /proc, which this system does not have")
def test_the_agent_reads_processes_from_proc_on_linux() -> None:
    assert isinstance(TABLE, ProcfsTable)


@pytest.fixture
def odd_children(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sleeping processes whose names test the parsing: longer than the kernel keeps (completed
    from the command line), and holding spaces and parentheses."""
    if NO_PROC:
        pytest.skip("reads Linux's /proc, which this system does not have")
    children = []
    for name in ("fleet-test-long-process-name", "a) (b c", "plain"):
        exe = tmp_path / name
        exe.symlink_to(shutil.which("sleep") or "/bin/sleep")
        children.append(subprocess.Popen([str(exe), "30"]))
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                psutil.Process(c.pid).name() != Path(str(c.args[0])).name for c in children):
            time.sleep(0.02)  # until each has exec'd
        yield children
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_rows_read_from_proc_are_the_rows_psutil_gives(odd_children: list[subprocess.Popen[bytes]]) -> None:
    """Every field ProcfsTable reads itself equals psutil's: exactly for sleeping processes,
    and the identity fields for every process on the host."""
    identity = ("ppid", "name", "username", "create_time")
    theirs = {r["pid"]: r for r in ProcessTable(min_interval_s=0.0).snapshot()}
    ours = {r["pid"]: r for r in ProcfsTable(min_interval_s=0.0).snapshot()}
    after = {r["pid"]: r for r in ProcessTable(min_interval_s=0.0).snapshot()}
    # a process may start, end or exec another program meanwhile: compare those psutil saw alike twice
    steady = [pid for pid in theirs.keys() & after.keys()
              if all(theirs[pid][k] == after[pid][k] for k in identity)]
    assert len(steady) >= len(theirs) - 5
    assert set(steady) <= ours.keys()
    for child in odd_children:
        mine, psutils = ours[child.pid], theirs[child.pid]
        assert mine["name"] == Path(str(child.args[0])).name
        assert {k: v for k, v in mine.items() if k != "cpu_percent"} == \
            {k: v for k, v in psutils.items() if k != "cpu_percent"}
        assert mine["status"] == psutil.STATUS_SLEEPING and mine["ppid"] == os.getpid()
    for pid in steady:
        for key in identity:
            assert ours[pid][key] == theirs[pid][key], (pid, key)


def test_a_reused_pid_is_measured_afresh_from_proc(odd_children: list[subprocess.Popen[bytes]]) -> None:
    """A pid whose start time differs from the one recorded is another process: no CPU share
    computed against the old one's times until the next request."""
    pid = odd_children[0].pid
    table = ProcfsTable(min_interval_s=0.0)
    table.prime()
    started, used, at = table._cpu[pid]
    table._cpu[pid] = (started - 1000, used, at)  # what an earlier process with this pid would have had
    row = next(r for r in table.snapshot() if r["pid"] == pid)
    assert row["cpu_percent"] is None and row["ppid"] == os.getpid()
    again = next(r for r in table.snapshot() if r["pid"] == pid)
    assert again["cpu_percent"] == 0.0


def test_proc_table_reads_status_only_for_rows_it_returns(monkeypatch: pytest.MonkeyPatch,
                                                          odd_children: list[subprocess.Popen[bytes]]) -> None:
    """stat for every process; status (and a long name's cmdline) for the `limit` rows returned;
    statm for every process only when sorting by memory."""
    table = ProcfsTable(min_interval_s=0.0)
    table.prime()
    reads: collections.Counter[str] = collections.Counter()
    real = procfs.read

    def counted(pid: int, name: str) -> Any:
        reads[name] += 1
        return real(pid, name)

    monkeypatch.setattr(procfs, "read", counted)
    rows, total = table.top("cpu_percent", 3)
    assert len(rows) == 3 and total >= 10
    assert total <= reads["stat"] <= total + 5, reads  # + processes that came (primed) or went meanwhile
    assert reads["status"] <= 3 + 2 and reads["cmdline"] <= 3 and reads["statm"] == 0, reads
    reads.clear()
    rows, total = table.top("rss", 3)
    assert reads["statm"] >= total - 2 and reads["status"] <= 3 + 2, reads
    assert [r["rss"] for r in rows] == sorted((r["rss"] for r in rows), reverse=True)


def test_a_process_that_ended_is_no_row() -> None:
    if NO_PROC:
        pytest.skip("reads Linux's /proc, which this system does not have")
    child = subprocess.Popen(["true"])
    child.wait()
    assert procfs.stat(child.pid) is None and procfs.status(child.pid) is None and procfs.rss(child.pid) is None
    assert procfs.stat(os.getpid()) is not None
