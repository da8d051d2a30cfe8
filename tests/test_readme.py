"""Every shell line of the README's quick start runs as printed against a real stack and ends by
itself: no error, no hang.

Which blocks count: every ```sh or ```bash block in README.md, by the heading it sits under. The
blocks under QUICK_START are run line by line; every other block is in SKIPPED_BLOCKS with the
reason, so a new block fails this test until it is sorted into one or the other. Lines that
cannot run in a test are in SKIPPED_LINES, with the reason.

How a line reaches the test's stack: it runs in bash, in a folder laid out as a checkout (the
test's tmp_path, with `.venv` linked to this one and `config.yaml` written for the test's broker
on a free port, topic prefix `fleet` as the README's topics say, the store at the default
`data/fleet.db`), so `.venv/bin/fleetctl` and `sqlite3 data/fleet.db` read what the services
write, as in a checkout. FLEET_MQTT_HOST/FLEET_MQTT_PORT are set as well, for fleet commands
that read no config. For `mosquitto_sub` and `mosquitto_rr` lines, one rule: `-h 127.0.0.1 -p
<port>` is inserted after the command's name, where a user's line reaches the broker on its
default localhost:1883. The agent runs with its default id, the host name, so `$(hostname)` in a
line names it.

A line passes when it exits 0 within LINE_TIMEOUT_S. One exception: `mosquitto_sub -W N` without
`-C` is a line that watches for N seconds and then stops, and mosquitto_sub exits 27 ("Timed
out") when -W ends it; such a line passes with 27 if it printed what it watched.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fleet_common.topics import sanitise_agent_id

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
README = ROOT / "README.md"
LINE_TIMEOUT_S = 30.0
QUICK_START = ("Two commands", "Watching the traffic and asking by hand")
SKIPPED_BLOCKS = {
    "Install an agent on another host": "installs into /opt and /etc as root on another host, "
                                        "for a broker elsewhere; its agent is what the quick start runs",
}
SKIPPED_LINES = {
    "make run": "runs the stack until Ctrl-C; the test starts the same services itself "
                "(persister, controller, agent) as processes",
    "make test": "is the test suite this test is part of",
}
MOSQUITTO_TIMED_OUT = 27


def shell_blocks() -> list[tuple[str, list[str]]]:
    """(heading, lines) of each ```sh / ```bash block in README.md, in order."""
    blocks: list[tuple[str, list[str]]] = []
    heading, block = "", None
    for line in README.read_text().splitlines():
        if block is not None:
            if line.startswith("```"):
                blocks.append((heading, block))
                block = None
            else:
                block.append(line)
        elif line.startswith(("```sh", "```bash")):
            block = []
        elif line.startswith("```"):
            block = None
        elif m := re.match(r"#+ (.*)", line):
            heading = m[1].strip()
    return blocks


def command(line: str) -> str:
    """The line without its trailing comment (a `#` after two spaces, as the README writes them)."""
    return re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()


def quick_start_lines() -> list[str]:
    lines = []
    for heading, block in shell_blocks():
        if heading in QUICK_START:
            lines += [command(line) for line in block if command(line)]
        else:
            assert heading in SKIPPED_BLOCKS, (
                f"README.md: the shell block under '{heading}' is neither run (QUICK_START) nor "
                f"skipped with a reason (SKIPPED_BLOCKS) in {__file__}")
    return lines


def for_test_broker(line: str, port: int) -> str:
    """The documented rule: mosquitto clients get the test broker's address after their name."""
    return re.sub(r"^(mosquitto_(?:sub|rr|pub))\b", rf"\1 -h 127.0.0.1 -p {port}", line)


def watches_until_timeout(line: str) -> bool:
    args = shlex.split(line)
    return args[0] == "mosquitto_sub" and "-W" in args and "-C" not in args


def test_the_quick_start_blocks_are_the_ones_this_test_knows() -> None:
    """The README still has the quick start's blocks, and the skipped lines are still in them."""
    headings = [heading for heading, _ in shell_blocks()]
    assert all(h in headings for h in QUICK_START), headings
    lines = quick_start_lines()
    assert all(skipped in lines for skipped in SKIPPED_LINES), lines


def wait_for_answers(db: Path, agent_id: str, types: set[str], timeout_s: float = 30.0) -> None:
    """Until the store holds an answer of each of `types` from `agent_id`: what `make run` shows
    before the README sends the reader to a second terminal."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                seen = {t for (t,) in conn.execute(
                    "select distinct type from requests where agent_id = ? and state = 'ok'", (agent_id,))}
            if types <= seen:
                return
        time.sleep(0.2)
    raise AssertionError(f"after {timeout_s:.0f} s the store holds answers of {sorted(seen)} only")


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str] | None:
    """`line` run by bash, or None if it is still running after LINE_TIMEOUT_S (then it is killed,
    with everything it started)."""
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_quick_start_line_runs_as_printed(tmp_path: Path, broker, procs) -> None:
    """Each shell line of the quick-start blocks exits 0 (or, watching, by its own timeout) within
    LINE_TIMEOUT_S against a real broker, persister, controller and agent."""
    for tool in ("mosquitto_sub", "mosquitto_rr", "sqlite3"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed, and the README's examples use it "
                        "(Debian: apt-get install mosquitto-clients sqlite3)")
    host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    if sanitise_agent_id(host) != host:
        pytest.skip(f"this host's name {host!r} is not a valid agent id as it is, so $(hostname) in "
                    f"the README's lines cannot name its agent ({sanitise_agent_id(host)!r})")
    (tmp_path / ".venv").symlink_to(VENV)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": "fleet"},
        "agent": {"outbox_path": str(tmp_path / "outbox.db"),
                  "heartbeat_path": str(tmp_path / "agent.heartbeat.json")},
    }))
    procs.start_persister(config)
    procs.start_controller(config)
    procs.start("agent", "fleet-agent", "--config", str(config))
    wait_for_answers(tmp_path / "data" / "fleet.db", host, {"cpu", "memory", "processes"})

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_MQTT_HOST="127.0.0.1", FLEET_MQTT_PORT=str(broker.port))
    failures = []
    for line in quick_start_lines():
        if line in SKIPPED_LINES:
            continue
        done = run_line(for_test_broker(line, broker.port), tmp_path, env)
        if done is None:
            failures.append(f"{line}\n    hung: still running after {LINE_TIMEOUT_S:.0f} s")
            continue
        watched = watches_until_timeout(line) and done.returncode == MOSQUITTO_TIMED_OUT
        if not (done.returncode == 0 or watched) or not done.stdout.strip():
            failures.append(f"{line}\n    exit {done.returncode}; stdout: {done.stdout[-800:]!r}; "
                            f"stderr: {done.stderr[-800:]!r}")
    assert not failures, "README.md lines that do not run as printed:\n" + "\n".join(failures)
