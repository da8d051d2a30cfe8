"""Many paho clients on one asyncio loop, through paho's external-loop callbacks.

A thread per client (paho's loop_start) does not scale to thousands of agents; here
the loop watches every socket, calls loop_read/loop_write when one is ready, and one
housekeeping task calls loop_misc (keepalive pings) for a slice of the clients at a time.
"""

# Why not aiomqtt (the design's asyncio client, which issue 14 asked this module to give way to):
# at 10,000 agents in one process it takes 2.7x the memory of this glue, 2-7x its CPU to connect,
# 6-23x its CPU when idle and 4x its CPU to answer, and answers a round 2-3.5x slower.
# bench/sim_client.py, 10,000 agents (MQTT 5, Last Will, QoS 1 subscription, retained birth), then
# one QoS 1 request to each answered with 1 KB at QoS 1; medians of 3 interleaved runs (glue,
# aiomqtt, glue, ...) on 2 shared cores, Mosquitto per broker_config/dev.conf, aiomqtt 2.5.1,
# paho-mqtt 2.2.0, Python 3.11:
#
#    two sessions,       connect all   RSS     CPU connecting   CPU idle   round    CPU round
#   load 3-7   glue          13.8 s   116 MB        6.8 s         0.8 %     5.1 s      1.8 s
#              aiomqtt       57.9 s   303 MB       48.1 s        18.2 %    11.4 s      7.9 s
#   load 7-8   glue          61.1 s   110 MB       19.0 s         3.2 %     7.5 s      2.1 s
#              aiomqtt       64.8 s   304 MB       40.8 s        19.6 %    25.7 s      7.7 s
#
# (CPU idle: % of a core over 10 s with keepalive only.) aiomqtt is built the same way (paho's
# socket callbacks on the loop) but adds, per client, a thread-pool hop for every CONNECT, a
# keepalive task waking every second (10,000 wake-ups a second), a task and asyncio.wait for every
# message received and an Event with wait_for for every QoS 1 publish; it also has no reconnect of
# its own. Rerun before revisiting (about 6 minutes; aiomqtt is not a dependency, pip install it):
#   .venv/bin/python bench/sim_client.py --runs 3

from __future__ import annotations

import asyncio
import logging
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("fleet.sim.glue")

MISC_SLICES = 10  # loop_misc visits every client once per MISC_SLICES * misc_step_s


class LoopGlue:
    def __init__(self, loop: asyncio.AbstractEventLoop, misc_step_s: float = 0.5) -> None:
        self.loop, self.misc_step_s = loop, misc_step_s
        self.clients: set[mqtt.Client] = set()

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
