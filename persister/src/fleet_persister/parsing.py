"""Checking messages, on the network thread or in worker processes.

Parsing and checking a response is most of the persister's work, and one Python process
runs one thread at a time: with every message parsed on the network thread, one persister
tops out at about one core. With `persister.parse_workers` > 0, the network thread only
queues what it receives; `ParseStage` hands chunks of it to worker processes and passes
the results on in the order the messages arrived (acknowledgements keep that order, and
so do the statuses of one agent). For SQLite the workers also encode each response's
`data` as the JSON text the store writes, so it is not encoded again on the writer thread.

If a worker dies, the messages it held are parsed in the persister itself, a new worker
is started, and nothing is lost or stored twice.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Union

import orjson

from fleet_common import (
    ContractError,
    ParsedTopic,
    Request,
    Response,
    Status,
    Topics,
    decode_object,
    iso,
    new_id,
    parse_request,
    parse_status,
)
from fleet_common.datatypes import BUILTIN
from fleet_common.messages import MAX_PAYLOAD_BYTES, response_of, unique_keys
from fleet_store import MAX_REJECTED_PAYLOAD, EncodedJSON, Incoming, RejectedRecord, dead_letter

from .datacheck import check_data

log = logging.getLogger("fleet.persister")

CHUNK = 200  # messages per hand-over to a worker
CHUNK_WAIT_S = 0.002  # how long a hand-over waits to fill, so that a busy stream goes in chunks
IN_FLIGHT_PER_WORKER = 3  # chunks handed over and not yet passed on, per worker

@dataclass(frozen=True)
class Ignored:
    """A message that is neither stored nor a dead letter: an empty payload on a status topic
    clears the agent's retained status, which is legitimate (fleetctl remove-agent's advice)."""

    topic: str
    why: str


Item = Union[Incoming[Request], Incoming[Response], Incoming[Status], RejectedRecord, Ignored]
# topic, payload, retained, when it was received (epoch s)
Raw = tuple[str, bytes, bool, float]


def rejected_record(topic: str, payload: bytes, reason: str, received_s: float, detail: str = "") -> RejectedRecord:
    """A dead letter; see stores.dead_letter."""
    return dead_letter(topic, payload, reason, detail, iso(received_s), new_id())


def parse_message(topics: Topics, topic: str, payload: bytes, retained: bool, received_s: float,
                  encode: bool = False) -> Item:
    """Validate one message; anything wrong with it becomes a RejectedRecord, never an exception.
    Times in it are checked against `received_s`, this persister's clock. With `encode`, a
    response's data comes as the JSON text SQLite stores (EncodedJSON)."""
    now = iso(received_s)
    source = (topic, payload)
    try:
        where = topics.parse(topic)
        if where.kind == "req":
            return Incoming(parse_request(payload, where, received_s), where.agent_id, now, source=source)
        if where.kind == "res":
            return Incoming(_response(payload, where, received_s, encode), where.agent_id, now, source=source)
        if not payload:
            return Ignored(topic, "an empty status clears the retained one")
        return Incoming(parse_status(payload, where, received_s), where.agent_id, now, retained, source=source)
    except ContractError as exc:
        reason, detail = exc.reason, exc.detail
    except Exception as exc:  # the persister never crashes on input
        reason, detail = f"invalid:{type(exc).__name__}", str(exc)
    return rejected_record(topic, payload, reason, received_s, detail)


def _response(payload: bytes, where: ParsedTopic, received_s: float, encode: bool) -> Response:
    """parse_response, then the data's check; the data is encoded once, for the check that no key
    is repeated and, with `encode`, for the store."""
    assert where.type is not None
    builtin = BUILTIN.get(where.type)
    if builtin is not None and builtin.max_payload_bytes < len(payload) <= MAX_PAYLOAD_BYTES:
        builtin.check_data({}, len(payload))  # refused before it costs a parse (larger: too_large)
    obj = decode_object(payload, check_keys_unique=False)
    data = obj.get("data")
    text = orjson.dumps(data) if isinstance(data, dict) else None
    unique_keys(payload, obj, text)
    response = response_of(obj, where, received_s)
    if response.data is not None:
        check_data(response.type, response.data, len(payload))
        if encode and text is not None:
            # Stores that keep JSON as text take it so (stores.ENCODES_JSON). Set on the response
            # just made, which nothing else holds yet: dataclasses.replace cost 5 us a message.
            object.__setattr__(response, "data", EncodedJSON(text.decode("utf-8")))
    return response


# Items travel back from a worker as tuples of their fields: pickling the dataclasses
# themselves took 9 µs per response there, the tuples 1.
_KINDS = (Request, Response, Status)
_RESPONSE = _KINDS.index(Response)
_FIELDS = tuple(tuple(f.name for f in dataclasses.fields(k)) for k in _KINDS)
_DATA = _FIELDS[_RESPONSE].index("data")
Packed = tuple[Any, ...]


def pack(item: Item) -> Packed:
    """An item as a tuple; a response's data encoded as text (EncodedJSON) goes as a plain str.
    An Incoming's source stays behind: the persister has the raw message already."""
    if isinstance(item, RejectedRecord):
        return (-1, *item.__dict__.values())
    if isinstance(item, Ignored):
        return (-2, item.topic, item.why)
    message = item.message
    values = tuple(message.__dict__.values())  # a dataclass sets its fields in their order
    kind = _KINDS.index(type(message))
    if kind == _RESPONSE and isinstance(values[_DATA], EncodedJSON):
        values = (*values[:_DATA], str(values[_DATA]), *values[_DATA + 1:])
    return (kind, item.agent_id, item.received_at, item.retained, *values)


def unpack(packed: Packed, encode: bool, raw: Raw) -> Item:
    kind = packed[0]
    if kind == -1:
        return RejectedRecord(*packed[1:])
    if kind == -2:
        return Ignored(*packed[1:])
    values = packed[4:]
    if encode and kind == _RESPONSE and values[_DATA] is not None:
        values = (*values[:_DATA], EncodedJSON(values[_DATA]), *values[_DATA + 1:])
    # the fields as the worker's dataclass had them, set without the frozen __init__'s checks:
    # the writer's side of the persister is its busiest, and this halves the cost of a message
    cls = _KINDS[kind]
    message: Any = cls.__new__(cls)
    message.__dict__.update(zip(_FIELDS[kind], values))
    return Incoming(message, packed[1], packed[2], packed[3], raw[:2])


def parse_chunk(topics: Topics, encode: bool, chunk: list[Raw]) -> list[Packed]:
    """What a worker does with one hand-over."""
    return [pack(parse_message(topics, *raw, encode=encode)) for raw in chunk]


def _worker_start(parent: int) -> None:
    """In each worker: Ctrl-C is the persister's to handle (it reaches the whole process
    group), and a worker whose persister is gone (killed with SIGKILL) leaves too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ParseStage:
    """Network thread -> worker processes -> `deliver(item, meta)`, in arrival order.

    Two threads of the persister run it: one hands chunks to the workers, one passes the
    results on. Both queues are bounded, so a slow writer holds back the network thread
    (and TCP the broker), as it does without workers."""

    def __init__(self, topics: Topics, workers: int, encode: bool, deliver: Callable[[Item, Any], None],
                 capacity: int) -> None:
        self.topics, self.workers, self.encode, self.deliver = topics, workers, encode, deliver
        self.capacity = max(1, capacity)
        self._in: queue.Queue[tuple[Raw, Any]] = queue.Queue()  # bounded by capacity, below
        self._handed: queue.Queue[
            tuple[Future[list[Packed]] | None, ProcessPoolExecutor, list[Raw], list[Any]] | None
        ] = queue.Queue(maxsize=workers * IN_FLIGHT_PER_WORKER)
        self._pool_lock = threading.Lock()
        self._pool = self._new_pool()
        self._stopping = threading.Event()
        self._busy = 0  # messages put and not yet passed on; at most capacity
        self._room = threading.Condition()
        self.restarts = 0
        self._threads = [threading.Thread(target=self._hand_over, name="parse-hand-over", daemon=True),
                         threading.Thread(target=self._pass_on, name="parse-pass-on", daemon=True)]

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_start, initargs=(os.getpid(),))
        for _ in range(self.workers):  # start the workers now, not on the first messages
            pool.submit(int)
        return pool

    def start(self) -> ParseStage:
        for t in self._threads:
            t.start()
        return self

    def put(self, raw: Raw, meta: Any, timeout: float) -> None:
        """Network thread; raises queue.Full if `capacity` messages are still held after `timeout`."""
        with self._room:
            if not self._room.wait_for(lambda: self._busy < self.capacity, timeout):
                raise queue.Full
            self._busy += 1
        self._in.put((raw, meta))

    def held(self) -> int:
        """Messages put here and not yet passed on."""
        return self._busy

    def idle(self) -> bool:
        """Everything put here has been passed on."""
        return self._busy == 0

    def stop(self, timeout_s: float) -> bool:
        """Pass on what was received, then end the workers; False if that took longer than timeout_s."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self._threads)
        self._pool.shutdown(wait=done, cancel_futures=True)
        return done

    # hand-over thread
    def _take(self) -> list[tuple[Raw, Any]]:
        try:
            first = self._in.get(timeout=0.1)
        except queue.Empty:
            return []
        taken = [first]
        if self._in.qsize() < CHUNK and not self._stopping.is_set():
            time.sleep(CHUNK_WAIT_S)
        while len(taken) < CHUNK:
            try:
                taken.append(self._in.get_nowait())
            except queue.Empty:
                break
        return taken

    def _hand_over(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                if self._stopping.is_set():
                    break
                continue
            raws = [t[0] for t in taken]
            pool = self._pool
            future: Future[list[Packed]] | None
            try:
                future = pool.submit(parse_chunk, self.topics, self.encode, raws)
            except Exception:  # the pool broke: pass-on parses this chunk itself and replaces the pool
                future = None
            self._handed.put((future, pool, raws, [t[1] for t in taken]))
        self._handed.put(None)

    # pass-on thread
    def _pass_on(self) -> None:
        while True:
            handed = self._handed.get()
            if handed is None:
                return
            future, pool, raws, metas = handed
            items: list[Item] | None = None
            if future is not None:
                try:
                    items = [unpack(p, self.encode, raw) for p, raw in zip(future.result(), raws)]
                except BrokenProcessPool as exc:
                    self._replace(pool, exc)
                except Exception as exc:  # the worker is fine; this chunk failed there
                    log.warning("parsing %d messages in a worker failed (%s: %s); parsing them here",
                                len(raws), type(exc).__name__, exc)
            else:
                self._replace(pool, None)
            if items is None:
                items = [parse_message(self.topics, *raw, encode=self.encode) for raw in raws]
            for item, meta in zip(items, metas):
                self.deliver(item, meta)
            with self._room:
                self._busy -= len(raws)
                self._room.notify()

    def _replace(self, broken: ProcessPoolExecutor, exc: BaseException | None) -> None:
        with self._pool_lock:
            if self._pool is not broken or self._stopping.is_set():
                return
            self.restarts += 1
            log.warning("a parse worker stopped unexpectedly (%s); parsing its messages here and "
                        "starting new workers", exc or "pool broken")
            broken.shutdown(wait=False, cancel_futures=False)
            self._pool = self._new_pool()


__all__ = ["CHUNK", "MAX_REJECTED_PAYLOAD", "Ignored", "Item", "ParseStage", "Raw", "pack", "parse_chunk",
           "parse_message", "rejected_record", "unpack"]
