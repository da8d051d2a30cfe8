"""Background load for the fault tests: request + response pairs at a fixed rate.

    python load.py --port P --prefix T --out ids.txt [--rate 200] [--twice]

A paho MQTT 5 client with a persistent session (clean start off): paho keeps every QoS 1
message until its PUBACK and resends it after a reconnect. Each pair gets a unique id,
written to --out once both messages are handed to paho ("produced"). On SIGTERM it stops
producing, waits (at most 120 s) until the broker has acknowledged everything, and exits
0 when it has. --twice publishes every message twice (duplicate deliveries).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common import Request, Response, Topics, iso
from fleet_common.cli import stop_event
from fleet_common.datatypes import example

AGENT = "load-0"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--twice", action="store_true")
    args = ap.parse_args()
    topics = Topics(args.prefix)
    stop = stop_event()  # not an Event set in a handler: that can hang inside stop.wait() below

    acked = 0
    lock = threading.Lock()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{os.getpid()}", protocol=mqtt.MQTTv5)
    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(0.2, 2)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect_async("127.0.0.1", args.port, keepalive=5, clean_start=False, properties=props)
    client.loop_start()

    published, n = 0, 0
    tag = f"{os.getpid():x}{int(time.time()):x}"
    started = time.monotonic()
    with open(args.out, "a", encoding="ascii") as out:
        while not stop.is_set():
            due = started + n / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                stop.wait(delay)
                continue
            id_ = f"ld{tag}x{n:07d}"
            now = time.time()
            req = Request(id=id_, type="cpu", issued_at=iso(now), expires_at=iso(now + 3600)).payload()
            res = Response.ok(id_, AGENT, "cpu", example("cpu", percent=1.0, n=n), 0.5).payload()
            for _ in range(2 if args.twice else 1):
                client.publish(topics.request(AGENT, "cpu"), req, qos=1)
                client.publish(topics.response(AGENT, "cpu"), res, qos=1)
                published += 2
            out.write(id_ + "\n")
            out.flush()
            n += 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            if acked >= published:
                break
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    print(f"load: produced {n} pairs, {published} messages, {acked} acknowledged", flush=True)
    return 0 if acked >= published else 1


if __name__ == "__main__":
    raise SystemExit(main())
