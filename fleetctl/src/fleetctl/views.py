"""What fleetctl prints: the fleet table, a history table, and the `up` summary line."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, TextIO

from fleet_common import health
from fleet_common.brokerwatch import ADVICE
from fleet_common.config import BUILTIN_TYPES, Config
from fleet_common.labels import Labels, format_labels, matches
from fleet_common.timefmt import ago
from fleet_store import StoreReader, describe, open_reader


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def status_rows(cfg: Config, since_s: float, selector: Labels | None = None) -> list[dict[str, Any]]:
    """The agents, those whose labels include every pair of `selector` when one is given."""
    store = open_reader(cfg.persister)
    try:
        stats = store.agent_stats(time.time() - since_s)
        rows = []
        for agent in store.agents():
            if selector and not matches(agent.labels, selector):
                continue
            s = stats.get(agent.agent_id)
            rows.append({
                "agent_id": agent.agent_id, "online": agent.online, "last_seen": agent.last_seen,
                "hostname": agent.hostname, "platform": agent.platform, "agent_version": agent.agent_version,
                "types": agent.types, "issued": s.issued if s else 0, "answered": s.answered if s else 0,
                "expired": s.expired if s else 0, "errors": s.errors if s else 0,
                "median_latency_ms": s.median_latency_ms if s else None, "labels": agent.labels,
            })
        return rows
    finally:
        store.close()


def render_status(rows: list[dict[str, Any]], as_json: bool, selector: Labels | None = None) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    with_labels = f" with labels {format_labels(selector)}" if selector else ""
    if not rows:
        return (f"no agent has labels {format_labels(selector)}" if selector
                else "no agents known yet (is the persister running, and has an agent connected?)")
    now = time.time()
    body = [[r["agent_id"], "online" if r["online"] else "offline", ago(r["last_seen"], now),
             f"{r['answered']}/{r['issued']}", fmt_ms(r["median_latency_ms"]), r["platform"],
             format_labels(r.get("labels")) or None] for r in rows]
    online = sum(1 for r in rows if r["online"])
    return (table(["AGENT", "STATE", "LAST SEEN", "ANSWERED/ISSUED", "MEDIAN LATENCY", "PLATFORM", "LABELS"], body)
            + f"\n\n{online} of {len(rows)} agents{with_labels} online")


def broker_warnings(cfg: Config) -> list[str]:
    """A line if the broker has dropped messages, as a running persister or controller on this
    machine last saw in the broker's $SYS tree (their heartbeat files); nothing otherwise."""
    seen: list[tuple[int, str]] = []
    for service, path in (("fleet-persister", cfg.persister.heartbeat.path),
                          ("fleet-controller", cfg.controller.heartbeat.path)):
        code, why = health.check(path)
        if code and not why.startswith("unhealthy"):
            continue  # not running here, or stale: what it saw is no news
        try:
            beat = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            dropped = int((beat.get("counters") or {}).get("broker", {}).get("dropped") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if dropped:
            seen.append((dropped, service))
    if not seen:
        return []
    dropped, service = max(seen)
    return [f"warning: the broker has dropped {dropped} messages since it started (its $SYS tree, as "
            f"{service} saw it): answers lost on their way to the persister. {ADVICE[0].upper()}{ADVICE[1:]}."]


def status_frame(cfg: Config, since_s: float, as_json: bool, selector: Labels | None = None) -> str:
    """One refresh of `fleetctl status --watch`: the table, or one line of JSON per refresh for scripts."""
    rows = status_rows(cfg, since_s, selector)
    if as_json:
        return json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "agents": rows,
                           "store": describe(cfg.persister)})
    return render_status(rows, False, selector) + "\n" + footer(cfg)


def footer(cfg: Config) -> str:
    """The last line of a table a reader prints: which store it read."""
    return f"store: {describe(cfg.persister)}"


def watch(frame: Callable[[], str], interval_s: float, stop: threading.Event, out: TextIO | None = None) -> None:
    """Print frame() every interval_s until `stop` is set. On a terminal the frame is redrawn in
    place (cursor home, each line cleared to its end, the rest of the screen cleared), so it
    does not flicker or scroll; otherwise (a pipe, a file) frames follow one another."""
    out = out or sys.stdout
    tty = out.isatty()
    while True:
        try:
            text = frame()
        except Exception as exc:  # a busy or restarting store: say so and try again next time
            text = f"cannot read the store ({type(exc).__name__}: {exc}); retrying every {interval_s:g} s"
        if tty:
            header = f"every {interval_s:g} s, Ctrl-C stops{time.strftime('%H:%M:%S'):>{40}}"
            lines = [header, "", *text.splitlines()]
            out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        else:  # a blank line between tables; JSON stays one line per frame
            out.write(text + ("\n\n" if "\n" in text else "\n"))
        out.flush()
        if stop.wait(interval_s):
            return


def summarise(type_: str, data: dict[str, Any] | None) -> str:
    """One short human line for a stored answer."""
    if not isinstance(data, dict):
        return ""
    try:
        if type_ == "cpu":
            return f"cpu {data.get('percent')}%, load {data.get('load_avg')}"
        if type_ == "memory":
            return f"memory {data['virtual']['percent']}% used, swap {data.get('swap', {}).get('percent')}%"
        if type_ == "disk":
            parts = data.get("partitions") or []
            full = max(parts, key=lambda p: p.get("percent") or 0, default=None)
            return f"{len(parts)} partitions" + (f", fullest {full['mountpoint']} {full['percent']}%" if full else "")
        if type_ == "network":
            nics = data.get("interfaces") or []
            return f"{len(nics)} interfaces, {sum(n.get('bytes_recv') or 0 for n in nics)} bytes received"
        if type_ == "processes":
            procs = data.get("processes") or []
            return f"{len(procs)} processes" + (f", top: {procs[0].get('name')}" if procs else "")
        if type_ == "os_info":
            return f"{data.get('os')} {data.get('release')}, up {data.get('uptime_s')} s"
    except (KeyError, TypeError, ValueError):
        pass
    return json.dumps(data)[:80]


def known_types(store: StoreReader, agent_id: str) -> set[str]:
    """The types `history` can show: the built-in ones, those the agent advertises, and any the store holds."""
    advertised = [t for a in store.agents() if a.agent_id == agent_id for t in (a.types or [])]
    return {*BUILTIN_TYPES, *advertised, *store.type_counts()}


def render_history(records: list[Any], as_json: bool) -> str:
    if as_json:
        return json.dumps([r.to_dict() if hasattr(r, "to_dict") else r.__dict__ for r in records], indent=2)
    if not records:
        return "no stored results for this agent and type"
    body = [[r.issued_at, r.state, fmt_ms(r.latency_ms),
             (r.error or {}).get("code") if r.state in ("error", "expired") and r.error else summarise(r.type, r.data)]
            for r in records]
    return table(["ISSUED AT", "STATE", "LATENCY", "RESULT"], body)


def summary_line(cfg: Config) -> str:
    """'agents: 1 online of 1 | stored answers: cpu 3, ...' for `fleetctl up`; empty if nothing yet."""
    try:
        store = open_reader(cfg.persister)
    except Exception:  # none yet (the persister creates it), or busy: the next summary will tell
        return ""
    try:
        agents = store.agents()
        counts = store.type_counts()
    except Exception:
        return ""
    finally:
        store.close()
    online = sum(1 for a in agents if a.online)
    answered = ", ".join(f"{t} {c['ok']}" for t, c in sorted(counts.items()) if c.get("ok"))
    return f"agents: {online} online of {len(agents)} | stored answers: {answered or 'none yet'}"
