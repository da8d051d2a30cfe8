"""The transport's ceiling for a Python client: a plain paho publisher or subscriber,
QoS 1, no parsing and no storage. Run as a process of its own; prints one JSON line.

    rawmqtt.py pub   --port P --topic-base B --count N --payloads FILE
    rawmqtt.py sub   --port P --filter F --count N [--client-id ID --session]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common import compat
from fleet_common.link import no_delay
from fleet_common.topics import Topics


def _client(client_id: str = "", session: bool = False) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def _connect(c: mqtt.Client, port: int, session: bool) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600 if session else 0
    props.ReceiveMaximum = 1000
    c.connect("127.0.0.1", port, keepalive=60, clean_start=not session, properties=props)
    no_delay(c)  # as every client of the system does


def publish(port: int, topic_base: str, count: int, payloads: list[bytes], types: list[str]) -> dict[str, Any]:
    c = _client()
    _connect(c, port, False)
    c.loop_start()
    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == count:
            done.set()

    c.on_publish = on_publish
    topics = Topics(topic_base)
    # built before the clock starts: the ceiling is the transport's, not the topic checks'
    names = [[topics.response(f"a{a}", t) for t in types] for a in range(100)]
    started = time.time()
    for i in range(count):
        k = i % len(payloads)
        while i - acked[0] >= 1000:  # stay inside the in-flight window instead of queueing everything
            time.sleep(0.0005)
        c.publish(names[i % 100][k], payloads[k], qos=1)
    done.wait(120)
    ended = time.time()
    c.disconnect()
    c.loop_stop()
    return {"sent": count, "acked": acked[0], "first": started, "last": ended}


def subscribe(port: int, topic_filter: str, count: int, client_id: str, session: bool,
              ready_file: str, timeout_s: float) -> dict[str, Any]:
    c = _client(client_id, session)
    got = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if got["n"] == 0:
            got["first"] = now
        got["n"] += 1
        got["bytes"] += len(msg.payload)
        got["last"] = now
        if got["n"] >= count:
            done.set()

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(topic_filter, qos=1)

    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = lambda *_: subscribed.set()
    _connect(c, port, session)
    c.loop_start()
    subscribed.wait(10)
    if ready_file:
        open(ready_file, "w").close()
    if count > 0:
        done.wait(timeout_s)
    c.disconnect()
    c.loop_stop()
    return {"received": got["n"], "bytes": got["bytes"], "first": got["first"], "last": got["last"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["pub", "sub"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic-base", default="raw")
    p.add_argument("--filter", default=Topics("raw").all_responses())
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--payloads", default="")
    p.add_argument("--client-id", default="")
    p.add_argument("--session", action="store_true")
    p.add_argument("--ready-file", default="")
    p.add_argument("--timeout-s", type=float, default=300)
    a = p.parse_args()
    compat.apply()  # as every service does: the ceiling of the paho the services run
    if a.mode == "pub":
        spec = json.loads(open(a.payloads, encoding="utf-8").read())
        out = publish(a.port, a.topic_base, a.count, [s.encode() for s in spec["payloads"]], spec["types"])
    else:
        out = subscribe(a.port, a.filter, a.count, a.client_id, a.session, a.ready_file, a.timeout_s)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
