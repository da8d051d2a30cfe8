"""Can one process hold 10,000 MQTT agents through aiomqtt as well as through the simulator's
own paho-to-asyncio glue? Measures both, interleaved, and prints the medians.

    .venv/bin/python bench/sim_client.py                       # 10,000 agents, 3 runs of each
    .venv/bin/python bench/sim_client.py --agents 500 --runs 1 # a quick look

Each run starts a fresh Mosquitto (broker_config/dev.conf, saved periodically as the bench runs
it) and one child process holding every agent in one variant:

- glue:    paho clients on the asyncio loop through on_socket_* callbacks, keepalive for a
           tenth of the clients every half second (the simulator's own, fleet_sim.glue);
- aiomqtt: one `async with aiomqtt.Client(...)` per agent, `client.messages`, `await publish`.

Each agent connects (MQTT 5, Last Will, at most --concurrency CONNECTs awaiting CONNACK),
subscribes to its request topic at QoS 1 and publishes a retained birth. Then this process
sends one QoS 1 request to every agent at once; each answers with a --payload-byte QoS 1
response. Figures: time until every agent is subscribed, the child's RSS, its CPU seconds
while connecting, idle (--idle-s, keepalive only) and answering, and the time for the round.
The figures and the decision they led to are in sim/src/fleet_sim/glue.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import psutil
from fleet_sim.glue import LoopGlue
from harness import DEV_CONF, client, connect, raise_nofile
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common.link import no_delay
from fleet_common.topics import Topics
from fleetctl.broker import EmbeddedBroker, free_port

VARIANTS = ("glue", "aiomqtt")


# --- the child: N agents in one process ------------------------------------------------------

def _connect_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    return props


def _reply_props(correlation: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation
    return props


async def run_glue(args: argparse.Namespace, ids: list[str], ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    glue = LoopGlue(loop)
    housekeeping = asyncio.create_task(glue.housekeeping(), name="housekeeping")
    gate = asyncio.Semaphore(args.concurrency)
    body = b"x" * args.payload
    topics = Topics(args.prefix)

    def make(agent_id: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=mqtt.MQTTv5,
                        reconnect_on_failure=False)
        c.will_set(topics.status(agent_id), b'{"online":false}', qos=1, retain=True)
        acked: asyncio.Future[None] = loop.create_future()

        def on_connect(cl: mqtt.Client, ud: Any, flags: Any, reason: Any, props: Any) -> None:
            cl.subscribe(topics.agent_requests(agent_id), qos=1)
            cl.publish(topics.status(agent_id), b'{"online":true}', qos=1, retain=True)
            if not acked.done():
                acked.set_result(None)

        def on_message(cl: mqtt.Client, ud: Any, msg: mqtt.MQTTMessage) -> None:
            cl.publish(topics.response(agent_id, "ping"), body, qos=1,
                       properties=_reply_props(msg.properties.CorrelationData))  # type: ignore[union-attr]

        c.on_connect, c.on_message = on_connect, on_message
        c.on_subscribe = lambda *a: ready()
        c.user_data_set(acked)
        glue.attach(c)
        return c

    async def one(agent_id: str) -> mqtt.Client:
        async with gate:
            c = make(agent_id)
            c.connect(args.host, args.port, keepalive=60, clean_start=True, properties=_connect_props())
            no_delay(c)
            await asyncio.wait_for(c.user_data_get(), 15)
            return c

    clients = await asyncio.gather(*(one(i) for i in ids))
    await asyncio.Event().wait()  # until SIGTERM
    print(housekeeping, clients)  # never reached; keeps both referenced


async def run_aiomqtt(args: argparse.Namespace, ids: list[str], ready: Callable[[], None]) -> None:
    import aiomqtt

    gate = asyncio.Semaphore(args.concurrency)
    body = b"x" * args.payload
    topics = Topics(args.prefix)

    async def one(agent_id: str) -> None:
        c = aiomqtt.Client(args.host, args.port, identifier=agent_id, protocol=aiomqtt.ProtocolVersion.V5,
                           clean_start=True, keepalive=60, properties=_connect_props(),
                           socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                           will=aiomqtt.Will(topics.status(agent_id), b'{"online":false}', 1, True))
        async with contextlib.AsyncExitStack() as stack:
            async with gate:
                await stack.enter_async_context(c)
            await c.subscribe(topics.agent_requests(agent_id), qos=1)
            ready()
            await c.publish(topics.status(agent_id), b'{"online":true}', qos=1, retain=True)
            async with asyncio.TaskGroup() as tg:
                async for msg in c.messages:
                    tg.create_task(c.publish(topics.response(agent_id, "ping"), body, qos=1,
                                             properties=_reply_props(getattr(msg.properties, "CorrelationData", None))))

    await asyncio.gather(*(one(i) for i in ids))


def child(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ids = [f"{args.prefix}-{i:05d}" for i in range(args.agents)]
    started = time.monotonic()
    count = [0]

    def ready() -> None:
        count[0] += 1
        if count[0] == args.agents:
            print(json.dumps({"connected_s": round(time.monotonic() - started, 2)}), flush=True)

    async def main() -> None:
        # No goodbye on SIGTERM: the broker is thrown away with the run, and 10,000 DISCONNECTs
        # would only delay the next one.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, os._exit, 0)
        await (run_glue if args.variant == "glue" else run_aiomqtt)(args, ids, ready)

    asyncio.run(main())


# --- the parent: a broker, a requester, the figures ------------------------------------------

class Requester:
    """One QoS 1 request to every agent at once; the time until every answer is in."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix, self.answers, self.done = prefix, 0, threading.Event()
        self.expected = 0
        subscribed = threading.Event()
        self.c = client(f"{prefix}-requester")
        self.c.on_connect = lambda cl, *a: cl.subscribe(Topics(prefix).all_responses(), qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._on_message
        connect(self.c, port)
        self.c.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the requester could not subscribe")

    def _on_message(self, *a: Any) -> None:
        self.answers += 1
        if self.answers >= self.expected:
            self.done.set()

    def round(self, ids: list[str], timeout_s: float) -> float:
        self.expected, started = len(ids), time.monotonic()
        for n, agent_id in enumerate(ids):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = Topics(self.prefix).response(agent_id, "ping")
            props.CorrelationData = str(n).encode()
            self.c.publish(Topics(self.prefix).request(agent_id, "ping"), b'{"id":"r%d"}' % n, qos=1, properties=props)
        if not self.done.wait(timeout_s):
            raise RuntimeError(f"{self.answers}/{len(ids)} answers in {timeout_s} s")
        return time.monotonic() - started

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def one_run(args: argparse.Namespace, variant: str, run: int, work: Path) -> dict[str, float]:
    text = re.sub(r"(?m)^autosave_on_changes\s+true\s*\n", "", DEV_CONF.read_text(encoding="utf-8"))
    template = work / "broker.conf"
    template.write_text(re.sub(r"(?m)^autosave_interval\s+\d+", "autosave_interval 10", text))
    prefix = f"sc{run}{variant[0]}"
    port = free_port()
    with EmbeddedBroker(template, port, work / f"broker-{prefix}", log=open(work / "mosquitto.log", "ab")):
        proc = subprocess.Popen([sys.executable, __file__, "child", variant, "--port", str(port), "--prefix", prefix,
                                 "--agents", str(args.agents), "--concurrency", str(args.concurrency),
                                 "--payload", str(args.payload)], stdout=subprocess.PIPE,
                                stderr=open(work / f"child-{prefix}.log", "ab"), text=True)
        p = psutil.Process(proc.pid)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{variant}: the child ended before connecting every agent: "
                                   + (work / f"child-{prefix}.log").read_text()[-2000:])
            connected_s = json.loads(line)["connected_s"]
            cpu_connect = cpu_s(p)
            time.sleep(args.idle_s)
            cpu_idle = cpu_s(p) - cpu_connect
            rss_idle = p.memory_info().rss
            requester = Requester(port, prefix)
            cpu0 = cpu_s(p)
            round_s = requester.round([f"{prefix}-{i:05d}" for i in range(args.agents)], args.round_timeout_s)
            cpu_round = cpu_s(p) - cpu0
            rss = p.memory_info().rss
            requester.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"connect_s": connected_s, "rss_mb": round(max(rss, rss_idle) / 2**20, 1),
            "cpu_connect_s": round(cpu_connect, 2), "idle_cpu_pct": round(100 * cpu_idle / args.idle_s, 1),
            "round_s": round(round_s, 2), "cpu_round_s": round(cpu_round, 2)}


def parent(args: argparse.Namespace) -> None:
    if "aiomqtt" in args.variants and importlib.util.find_spec("aiomqtt") is None:
        sys.exit("aiomqtt is not installed (the simulator does not use it): .venv/bin/pip install 'aiomqtt>=2,<3', "
                 "or --variants glue")
    if raise_nofile() < args.agents + 200:
        sys.exit(f"{args.agents} agents need {args.agents + 200} open files; raise the hard limit (ulimit -Hn)")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="sim-client-") as tmp:
        for run in range(args.runs):
            for variant in args.variants:  # interleaved: A B A B ..., so drifting load hits both alike
                figures = one_run(args, variant, run, Path(tmp))
                results[variant].append(figures)
                print(f"run {run + 1} {variant:8s} {json.dumps(figures)}", flush=True)
    keys = list(next(iter(results.values()))[0])
    print(f"\nmedians of {args.runs} runs, {args.agents} agents, {args.payload}-byte answers, "
          f"{os.cpu_count()} cores")
    print(f"{'':10s}" + "".join(f"{k:>15s}" for k in keys))
    for variant, runs in results.items():
        print(f"{variant:10s}" + "".join(f"{statistics.median(r[k] for r in runs):>15g}" for k in keys))
    if args.out:
        Path(args.out).write_text(json.dumps({"agents": args.agents, "runs": results}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100, help="CONNECTs awaiting CONNACK (fleet-sim's default)")
    parser.add_argument("--payload", type=int, default=1024, help="bytes in each answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--prefix", default="sc")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of keepalive only, for idle CPU")
    parser.add_argument("--round-timeout-s", type=float, default=120.0)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--out", default=None, help="also write every run's figures as JSON here")
    parser.add_argument("mode", nargs="?", default="parent", choices=("parent", "child"))
    parser.add_argument("variant", nargs="?", choices=VARIANTS)
    args = parser.parse_args()
    child(args) if args.mode == "child" else parent(args)


if __name__ == "__main__":
    main()
