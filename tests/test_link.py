"""The MQTT link every component uses, against a real Mosquitto: what it sets on its connection."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from fleet_common.config import load_config
from fleet_common.link import Link

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("conf", sorted((ROOT / "broker_config").glob("*.conf")), ids=lambda p: p.name)
def test_every_broker_config_sends_packets_at_once(conf: Path) -> None:
    """Nagle's algorithm on at the broker held each small packet for the client's delayed ACK: a
    request and its answer took 87 ms on loopback instead of 0.4 ms (docs/sizing.md)."""
    lines = [line.split("#")[0].split() for line in conf.read_text(encoding="utf-8").splitlines()]
    assert ["set_tcp_nodelay", "true"] in lines


def test_the_link_turns_nagle_off_on_each_connection(broker: Any, write_config: Any) -> None:
    """The client's side of the same: TCP_NODELAY on the socket, set when the connection is made
    (in on_connect, so a reconnect gets it too)."""
    cfg = load_config(str(write_config()))
    link = Link(cfg.mqtt, "nodelay-test").start()
    try:
        assert link.wait_connected(10)
        sock = link.client.socket()
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.stop()
