"""Many paho clients on one asyncio loop, through paho's external-loop callbacks.

A thread per client (paho's loop_start) does not scale to thousands of agents; here
the loop watches every socket, calls loop_read/loop_write when one is ready, and one
housekeeping task calls loop_misc (keepalive pings) for a slice of the clients at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Set

import paho.mqtt.client as mqtt

log = logging.getLogger("fleet.sim.glue")

MISC_SLICES = 10  # loop_misc visits every client once per MISC_SLICES * misc_step_s


class LoopGlue:
    def __init__(self, loop: asyncio.AbstractEventLoop, misc_step_s: float = 0.5) -> None:
        self.loop, self.misc_step_s = loop, misc_step_s
        self.clients: Set[mqtt.Client] = set()

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing

    def _open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_reader(sock, _read, client)
        self.clients.add(client)

    def _close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)
        self.clients.discard(client)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(sock, _write, client)

    def _done_writing(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)

    async def housekeeping(self) -> None:
        """Keepalive pings and timeouts for every client, a slice per step so no step stalls the loop."""
        turn = 0
        while True:
            await asyncio.sleep(self.misc_step_s)
            clients = list(self.clients)
            for client in clients[turn % MISC_SLICES::MISC_SLICES]:
                try:
                    client.loop_misc()
                except Exception:  # one broken client must not stop the others' pings
                    log.debug("loop_misc failed", exc_info=True)
            turn += 1


def _read(client: mqtt.Client) -> None:
    try:
        client.loop_read()
    except Exception:  # paho reports connection loss through on_disconnect; anything else is a bug to log
        log.exception("loop_read failed for %r", client._client_id)


def _write(client: mqtt.Client) -> None:
    try:
        client.loop_write()
    except Exception:
        log.exception("loop_write failed for %r", client._client_id)
