"""Running a job (fleet_common.jobs) over one MQTT 5 connection with aiomqtt: read the fleet
from the broker's retained statuses, send one request per matching agent, wait for the answers
of those online, and tally them as they come.

Only fleetctl and the dashboard import this module (they depend on aiomqtt); the agent never does.

- Answers come back on each agent's own `<prefix>/<agent>/res/<type>`, the request's
  ResponseTopic: the persister stores them as it stores any answer, and this connection, one
  subscription to `<prefix>/+/res/<type>`, picks out its own by request id.
- Sending: evenly over at most SPREAD_S (one request a millisecond below 1,000 agents), QoS 1,
  with no more unacknowledged at once than the broker's Receive Maximum (or MAX_IN_FLIGHT): a
  broker that is slow to acknowledge slows the job down instead of queueing, or dropping, the rest.
- Waiting: each online agent for `timeout_s` from when its request went out; the wait ends as soon
  as none is left waiting. The job's requests expire at the broker `expires_s` after they were
  sent, so an offline agent that comes back by then answers, and the persister stores it.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from .ask import build_request
from .config import Config
from .errors import ContractError, FleetError
from .jobs import (
    ERROR,
    NO_ANSWER,
    OK,
    QUEUED,
    WAITING,
    AgentResult,
    Candidate,
    JobResult,
    JobSpec,
    Tally,
    candidates,
    new_job_id,
    select,
)
from .messages import Response, Status, parse_response, parse_status

SPREAD_S = 1.0  # a job's requests go out evenly over at most this long...
SPREAD_PER_REQUEST_S = 0.001  # ...and over a millisecond per request for fewer than 1,000
# Unacknowledged requests at once, at most (fewer if the broker allows fewer). Enough for 10,000
# a second at 25 ms from PUBLISH to PUBACK; aiomqtt's cost per publish grows with it (it counts
# its pending calls on each).
MAX_IN_FLIGHT = 256
TALLY_EVERY_S = 0.1  # how often on_tally is told, while a job waits
CONNECT_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 30.0

OnTally = Callable[[Tally], None]


class NoTargets(FleetError):
    """No known agent matches the job's selection: nothing was sent."""


class JobRun:
    """One job on one connection: `await JobRun(cfg, spec).run(known)`. Its timings (event-loop
    clock, seconds) stay readable afterwards, for the bench."""

    def __init__(self, cfg: Config, spec: JobSpec, on_tally: OnTally | None = None,
                 client_name: str = "fleetctl", job_id: str | None = None) -> None:
        self.cfg, self.spec, self.on_tally = cfg, spec, on_tally
        self.topics = cfg.mqtt.topics()
        self.job = job_id or new_job_id()
        self.client_id = f"{client_name}-job-{uuid.uuid4().hex[:12]}"
        self.statuses: dict[str, Status] = {}
        self.results: dict[str, AgentResult] = {}
        self.pending: dict[str, tuple[str, float]] = {}  # request id -> (agent id, when it went out)
        self.deadlines: collections.deque[tuple[float, str]] = collections.deque()  # in the order sent
        self.waiting = 0
        self.receive_maximum = 65535  # the broker's, from its CONNACK
        self.sent_at: list[float] = []  # when each request went out
        self.connected = self.send_started = self.send_done = self.last_answer = self.ended = 0.0
        self.unacked = 0  # requests sent that the broker has not acknowledged yet
        self._changed: asyncio.Event | None = None
        self._acked = asyncio.Event()
        self._sending_done = False

    async def run(self, known: Iterable[Candidate] = ()) -> JobResult:
        """Send the job to the agents that match, wait, and return its results. `known`: the
        store's agents (labels of those now offline; the fleet itself if the broker will not
        show this user the statuses). NoTargets if none matches; FleetError if the broker cannot
        be reached or the connection is lost."""
        self._changed = asyncio.Event()
        client = self._client()
        where = f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}"
        try:
            async with client:
                return await self._run(client, known)
        except MqttConnectError as exc:
            raise FleetError(f"the broker at {where} refused the connection ({exc}); check mqtt.username "
                             "and the password (FLEET_MQTT_PASSWORD)") from None
        except aiomqtt.MqttError as exc:
            raise FleetError(f"cannot reach the broker at {where} ({exc}); is it running? (see mqtt.host/"
                             "mqtt.port)") from None

    def _client(self) -> aiomqtt.Client:
        mq = self.cfg.mqtt
        tls = aiomqtt.TLSParameters(ca_certs=mq.tls.ca_file, certfile=mq.tls.cert_file,
                                    keyfile=mq.tls.key_file) if mq.tls.enabled else None
        client = aiomqtt.Client(mq.host, mq.port, username=mq.username, password=mq.password,
                                identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
                                tls_params=tls, keepalive=mq.keepalive_s, timeout=CONNECT_TIMEOUT_S,
                                max_inflight_messages=0)  # no limit in paho: the job's own window is it
        client.pending_calls_threshold = MAX_IN_FLIGHT + 10  # aiomqtt warns past it; the window bounds it
        # aiomqtt keeps the CONNACK's properties to itself: the broker's Receive Maximum is read
        # on the way through to its own handler.
        paho = client._client
        handler: Any = paho.on_connect

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            self.receive_maximum = int(getattr(properties, "ReceiveMaximum", 65535) or 65535)
            handler(c, userdata, flags, reason, properties)

        paho.on_connect = on_connect
        theirs: Any = paho.on_publish  # what aiomqtt's own publish() waits on: unchanged for it

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any = None) -> None:
            self._on_puback()
            theirs(c, userdata, mid, reason, properties)

        paho.on_publish = on_publish
        return client

    async def _run(self, client: aiomqtt.Client, known: Iterable[Candidate]) -> JobResult:
        loop = asyncio.get_running_loop()
        self.connected = loop.time()
        statuses_readable = not _refused(await client.subscribe(self.topics.all_status(), qos=0))
        answers = self.topics.all_responses_of(self.spec.type)
        if _refused(await client.subscribe(answers, qos=1)):
            raise FleetError(f"the broker does not let user {self.cfg.mqtt.username!r} read {answers}, where the "
                             "answers come; a job needs an operator user ('fleetctl add-user NAME --role operator')")
        # SUBACKs come in order, each after the retained messages of the subscriptions before it:
        # every retained status is in the queue now.
        messages = client.messages
        for _ in range(len(messages)):
            self._on_message(await messages.__anext__(), loop.time())
        # No status at all (a broker that drops what this user may not read, or one that lost its
        # retained messages): the store's agents are the fleet.
        fleet = candidates(self.statuses if statuses_readable and self.statuses else None, known)
        targets = select(fleet, self.spec)
        if not targets:
            raise NoTargets(f"no known agent is one of {self.spec.describe()} (of {len(fleet)} known); "
                            "'fleetctl status' lists the fleet; nothing was sent")
        for t in targets:
            self.results[t.agent_id] = AgentResult(t.agent_id, WAITING if t.online else QUEUED)
        self.waiting = sum(1 for t in targets if t.online)
        reader = asyncio.create_task(self._read(client), name=f"job-{self.job}-answers")
        # online agents first: their answers are waited for
        sender = asyncio.create_task(self._send(client, sorted(targets, key=lambda t: not t.online)),
                                     name=f"job-{self.job}-send")
        try:
            await self._wait(reader, sender)
        finally:
            reader.cancel()
            if not sender.done():
                sender.cancel()
            await asyncio.gather(reader, sender, return_exceptions=True)
        self.ended = loop.time()
        if self.on_tally is not None:
            self.on_tally(Tally.of(self.results.values()))
        return JobResult(self.job, self.spec.type, list(self.results.values()))

    async def _send(self, client: aiomqtt.Client, targets: list[Candidate]) -> None:
        """Publish straight through paho, counting PUBACKs (see _client): aiomqtt's publish() costs a
        task, an event and a timer per message, and counts its pending calls on each, which at
        10,000 agents was most of the job's CPU."""
        loop = asyncio.get_running_loop()
        window = max(1, min(self.receive_maximum, MAX_IN_FLIGHT))
        spread = min(SPREAD_S, len(targets) * SPREAD_PER_REQUEST_S)
        self.send_started = start = loop.time()
        for i, target in enumerate(targets):
            delay = start + spread * i / len(targets) - loop.time()
            if delay > 0.002:  # below that a sleep costs more than it spreads
                await asyncio.sleep(delay)
            await self._acked_down_to(window - 1)
            req = build_request(self.topics, target.agent_id, self.spec.type, self.spec.expires_s,
                                self.spec.params, job=self.job)
            info = client._client.publish(req.topic, req.payload(), qos=1, properties=req.properties)
            if info.rc != 0:
                raise FleetError(f"paho could not send the request to {target.agent_id} (error {info.rc})")
            now = loop.time()
            self.unacked += 1
            self.pending[req.request.id] = (target.agent_id, now)
            self.results[target.agent_id].request_id = req.request.id
            if target.online:
                self.deadlines.append((now + self.spec.timeout_s, target.agent_id))
            self.sent_at.append(now)
        await self._acked_down_to(0)  # every request is at the broker
        self.send_done = loop.time()
        self._sending_done = True
        self._poke()

    async def _acked_down_to(self, most: int) -> None:
        """Until no more than `most` requests wait for their PUBACK; FleetError if the broker stops
        acknowledging them for ACK_TIMEOUT_S."""
        while self.unacked > most:
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), ACK_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise FleetError(f"the broker acknowledged none of {self.unacked} requests for {ACK_TIMEOUT_S:g} s; "
                                 "it is overloaded or the connection is stuck") from None

    def _on_puback(self) -> None:
        self.unacked -= 1
        self._acked.set()

    async def _read(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        async for message in client.messages:
            self._on_message(message, loop.time())

    async def _wait(self, reader: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        next_tally = loop.time()
        while True:
            for task, what in ((sender, "sending"), (reader, "waiting for the answers")):
                if task.done() and (task.cancelled() or task.exception() is not None):
                    exc = None if task.cancelled() else task.exception()
                    raise FleetError(f"lost the connection to the broker while {what} ({exc}); "
                                     f"'fleetctl job {self.job}' shows what the store received")
            now = loop.time()
            while self.deadlines and self.deadlines[0][0] <= now:
                _, agent_id = self.deadlines.popleft()
                result = self.results[agent_id]
                if result.status == WAITING:
                    result.status = NO_ANSWER
                    self.waiting -= 1
            if self.waiting == 0 and self._sending_done:
                return
            if self.on_tally is not None and now >= next_tally:
                self.on_tally(Tally.of(self.results.values()))
                next_tally = now + TALLY_EVERY_S
            timeout = TALLY_EVERY_S if not self.deadlines else min(TALLY_EVERY_S, self.deadlines[0][0] - now)
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, timeout))
            except asyncio.TimeoutError:
                pass
            self._changed.clear()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _on_message(self, message: aiomqtt.Message, now: float) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            where = self.topics.parse(message.topic.value)
            if where.kind == "status":
                if payload:
                    self.statuses[where.agent_id] = parse_status(payload, where)
                else:  # an empty retained status clears the agent's (fleetctl remove-agent)
                    self.statuses.pop(where.agent_id, None)
                return
            if where.kind != "res":
                return
            response = parse_response(payload, where)
        except ContractError:
            return  # not ours to judge: the persister records it as a dead letter
        self._answer(where.agent_id, response, now)

    def _answer(self, agent_id: str, response: Response, now: float) -> None:
        sent = self.pending.get(response.id)
        if sent is None or sent[0] != agent_id:
            return  # another request's answer (the controller's), or not from the agent asked
        del self.pending[response.id]
        result = self.results[agent_id]
        if result.status == WAITING:
            self.waiting -= 1
            if self.waiting == 0:
                self._poke()
        # an agent marked no_answer, or a queued one that came back, counts from now on
        result.status = OK if response.status == "ok" else ERROR
        result.request_id = response.id
        result.latency_ms = round((now - sent[1]) * 1000, 3)
        result.data, result.error = response.data, response.error
        self.last_answer = now

    def peak_rate_per_s(self, bucket_s: float = 0.1) -> float:
        """The most requests sent in any `bucket_s`, per second."""
        if not self.sent_at:
            return 0.0
        counts = collections.Counter(int((t - self.sent_at[0]) / bucket_s) for t in self.sent_at)
        return max(counts.values()) / bucket_s


def _refused(codes: Any) -> bool:
    """Whether a SUBACK refused the subscription (a reason code of 0x80 or more)."""
    return any(getattr(code, "is_failure", False) or (isinstance(code, int) and code >= 0x80) for code in codes or ())


async def run_job(cfg: Config, spec: JobSpec, known: Iterable[Candidate] = (), on_tally: OnTally | None = None,
                  client_name: str = "fleetctl") -> JobResult:
    """Run one job (see JobRun.run)."""
    return await JobRun(cfg, spec, on_tally, client_name).run(known)


def run_job_blocking(cfg: Config, spec: JobSpec, known: Iterable[Candidate] = (), on_tally: OnTally | None = None,
                     client_name: str = "fleetctl") -> JobResult:
    """run_job from code that is not asyncio (fleetctl, a dashboard request's thread): its own event loop."""
    return asyncio.run(run_job(cfg, spec, known, on_tally, client_name))


__all__ = ["MAX_IN_FLIGHT", "SPREAD_S", "JobRun", "NoTargets", "OnTally", "run_job", "run_job_blocking"]
