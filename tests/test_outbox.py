"""The agent's durable outbox (fleet_agent.outbox): bounded with counted drops, ordered replay,
delete on PUBACK, its path, what a damaged file does, and the drop count in the agent's status."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import wait_for
from faults.faultlib import Proxy
from test_agent import Client, req

from fleet_agent.agent import Agent
from fleet_agent.outbox import Outbox, OutboxError
from fleet_common import Topics
from fleet_common.config import load_config


def fill(box: Outbox, n: int, start: int = 0) -> list[int]:
    return [box.put(f"t/{i}", f"answer {i}".encode(), f"c{i}".encode() if i % 2 else None)
            for i in range(start, start + n)]


def test_bounded_drops_the_oldest_and_counts_drops_across_reopen(tmp_path: Path) -> None:
    """Beyond max_messages the oldest entries go; the drop count is kept in the file and survives a reopen."""
    path = str(tmp_path / "outbox.db")
    box = Outbox(path, max_messages=5)
    fill(box, 8)
    assert box.counts() == {"queued": 5, "dropped": 3}
    assert [topic for _, topic, _, _ in box.entries()] == [f"t/{i}" for i in range(3, 8)]
    box.close()
    again = Outbox(path, max_messages=5)
    assert again.counts() == {"queued": 5, "dropped": 3}
    fill(again, 2, start=8)
    assert again.counts() == {"queued": 5, "dropped": 5}
    assert [topic for _, topic, _, _ in again.entries()] == [f"t/{i}" for i in range(5, 10)]
    again.close()
    smaller = Outbox(path, max_messages=2)  # a lowered limit trims on the next put
    fill(smaller, 1, start=10)
    assert smaller.counts() == {"queued": 2, "dropped": 9}
    smaller.close()


def test_replay_is_in_order_and_pages_with_after(tmp_path: Path) -> None:
    """entries() returns topic, payload and correlation in put order, paged by sequence number."""
    box = Outbox(str(tmp_path / "o.db"), max_messages=100)
    seqs = fill(box, 7)
    assert seqs == sorted(seqs)
    first = box.entries(limit=3)
    rest = box.entries(after=first[-1][0])
    assert [e[0] for e in first + rest] == seqs
    assert first[1] == (seqs[1], "t/1", b"answer 1", b"c1") and first[0][3] is None
    box.close()


def test_delete_on_ack_removes_only_those_entries(tmp_path: Path) -> None:
    """delete() removes exactly the acknowledged entries, persistently; unknown or repeated seqs are harmless."""
    path = str(tmp_path / "o.db")
    box = Outbox(path, max_messages=5000)
    seqs = fill(box, 1200)  # more than one 500-row chunk
    box.delete([*seqs[:1000], 99999])
    box.delete(seqs[:10])  # a second PUBACK for the same entries
    box.delete([])
    assert box.counts() == {"queued": 200, "dropped": 0}
    box.close()
    again = Outbox(path, max_messages=5000)
    assert [e[0] for e in again.entries(limit=1000)] == seqs[1000:]
    assert again.queued == 200
    again.close()


def test_path_expands_home_and_creates_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`~` is the user's home and missing parent folders are created."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    box = Outbox("~/.local/state/fleet-agent/deep/outbox.db", 10)
    expected = tmp_path / "home" / ".local" / "state" / "fleet-agent" / "deep" / "outbox.db"
    assert box.path == str(expected) and expected.exists()
    box.close()


def test_corrupt_file_is_moved_aside_and_a_fresh_outbox_started(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A file that is not an outbox (garbage bytes, or SQLite with other tables) is renamed
    <path>.corrupt-<time> with an error logged, and the agent starts with an empty outbox."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite " * 500)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE outbox (something_else TEXT)")
    con.commit()
    con.close()
    for path, original in ((garbage, garbage.read_bytes()), (foreign, foreign.read_bytes())):
        with caplog.at_level(logging.ERROR, logger="fleet.agent.outbox"):
            box = Outbox(str(path), 10)
        assert box.recovered_from is not None and box.counts() == {"queued": 0, "dropped": 0}
        assert Path(box.recovered_from).read_bytes() == original
        assert f"moved it to {box.recovered_from}" in caplog.text
        fill(box, 2)
        assert box.queued == 2
        box.close()


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    """A path that cannot be used at all raises OutboxError naming agent.outbox_path, without touching files."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutboxError, match=r"agent\.outbox_path"):
        Outbox(str(tmp_path / "a-file" / "outbox.db"), 10)
    (tmp_path / "a-dir.db").mkdir()
    with pytest.raises(OutboxError, match=r"agent\.outbox_path"):
        Outbox(str(tmp_path / "a-dir.db"), 10)
    assert (tmp_path / "a-file").read_text() == "x"


def test_drop_count_is_published_in_the_status(broker: Any, write_config: Callable[..., Path], prefix: str,
                                               tmp_path: Path) -> None:
    """An agent whose answers are lost on the wire (proxy) with outbox_max_messages 3 drops the
    oldest, and its retained status reports the count once the link is back."""
    agent_id, topics = "host-ob", Topics(prefix)
    proxy = Proxy(broker.port)
    cfg = write_config("agent", agent={"id": agent_id, "outbox_max_messages": 3}, mqtt={"port": proxy.port})
    agent = Agent(load_config(str(cfg))).start()
    client = Client(broker.port, topics.status(agent_id), topics.response_base(agent_id) + "+")
    try:
        assert agent.wait_connected(10)
        client.wait(lambda m: m.payload.get("online") is True, "birth status")
        proxy.set_mode("drop_publish")  # requests still arrive; answers (and statuses) vanish
        sent = [req("ping") for _ in range(10)]
        for r in sent:
            client.request(topics.request(agent_id, "ping"), r.payload())
        wait_for(lambda: agent.stats["answered"] >= 10, 20, what="the agent answering into its outbox")
        assert agent.outbox.counts() == {"queued": 3, "dropped": 7}
        proxy.set_mode("pass", reset=True)
        status = client.wait(lambda m: m.payload.get("online") is True
                             and m.payload.get("outbox", {}).get("dropped") == 7, "a status with the drops")
        assert status.payload["outbox"]["queued"] <= 3
        # paho still holds the dropped seven it had sent, so they may arrive too; the newest three must
        wait_for(lambda: {m.payload.get("id") for m in client.find(lambda m: "/res/" in m.topic)}
                 >= {r.id for r in sent[-3:]}, 20, what="the three newest answers delivered from the outbox")
    finally:
        agent.stop()
        client.close()
        proxy.close()
