"""Every workaround for paho-mqtt's internals, in one place, applied on purpose: each service
calls `apply()` from its `main()`. Importing this module (or `fleet_common.link`) changes nothing.

Why any: speed. paho builds a `Properties` object for every MQTT 5 packet it sends or receives
with properties, and its constructor builds two 27-entry tables for that one object; `clear()`,
`isEmpty()` and name lookups then scan those tables by name. Building them was about 35 % of the
controller's CPU at 100,000 agents (docs/sizing.md), 15 % of the persister's, and a large part
of the agent answering a `ping`.

1. `apply()` keeps paho's tables once, on the class, and replaces the scans with lookups in maps
   built from those same tables. Packing, unpacking and every error message stay paho's own code.
   It relies on paho 2.x's `Properties.__init__` setting the instance attributes `types`, `names`
   and `properties` and on the methods named in PATCHED; if paho's class no longer looks like
   that, it changes nothing, logs one warning and returns False: the services then run on paho's
   own class, correct and slower. tests/test_compat.py fails when that happens.
2. `PackedProperties` are PUBLISH properties encoded once, when made (MQTT 5, section 2.2.2). It
   relies on paho's client calling only `pack()` on the properties it sends (and `str()` in its
   debug log); tests/test_compat.py checks both, and that the bytes are paho's own.

Without `apply()` nothing is wrong, only slower: `PackedProperties` then runs paho's own, costly,
constructor (see its docstring).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Callable

import paho.mqtt
from paho.mqtt.exception import MQTTException  # what paho's Properties raises
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

PATCHED = ("__init__", "__setattr__", "getIdentFromName", "allowsMultiple", "getNameFromIdent", "clear", "isEmpty")
ORIGINAL: dict[str, Callable[..., Any]] = {}  # paho's own methods, kept when apply() replaced them
_PRIVATE = frozenset(("packetType", "types", "names", "properties"))  # paho's __setattr__ lets these through
_MULTIPLE = (11, 38)  # Subscription Identifier, User Property: what paho's allowsMultiple() lists
_RANGES = {"ReceiveMaximum": (1, 65535), "TopicAlias": (1, 65535), "TopicAliasMaximum": (0, 65535),
           "MaximumPacketSize": (1, 268435455), "SubscriptionIdentifier": (1, 268435455)}
_BINARY = ("RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator")

log = logging.getLogger("fleet.compat")


def applied() -> bool:
    return bool(ORIGINAL)


def apply() -> bool:
    """Make paho's Properties cheap to build (idempotent). False, with one warning and nothing
    changed, if paho's class is not the one this was written against."""
    if ORIGINAL:
        return True
    if not _install():
        log.warning("paho-mqtt %s's Properties class is not the one fleet_common.compat was written for; "
                    "running without its speed-up (correct, but slower)", paho.mqtt.__version__)
        return False
    return True


def _install() -> bool:
    try:
        template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        types, names, table = template.types, template.names, template.properties
        ident_of = {name.replace(" ", ""): ident for name, ident in names.items()}
        name_of: dict[int, str] = {}
        for name, ident in names.items():  # the last name wins, as in paho's getNameFromIdent()
            name_of[ident] = name
        if len(ident_of) != len(names) or set(table) != set(name_of) or not all(
                callable(getattr(Properties, m, None)) for m in PATCHED):
            return False
    except Exception:  # pragma: no cover - another paho
        return False

    def __init__(self: Properties, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def getIdentFromName(self: Properties, compressedName: str) -> int:
        return ident_of.get(compressedName, -1)

    def allowsMultiple(self: Properties, compressedName: str) -> bool:
        return ident_of.get(compressedName, -1) in _MULTIPLE

    def getNameFromIdent(self: Properties, identifier: int) -> Any:
        return name_of.get(identifier)

    def clear(self: Properties) -> None:
        for key in [k for k in vars(self) if k in ident_of]:
            delattr(self, key)

    def isEmpty(self: Properties) -> bool:
        return not any(k in ident_of for k in vars(self))

    def __setattr__(self: Properties, name: str, value: Any) -> None:
        name = name.replace(" ", "")
        if name in _PRIVATE:
            object.__setattr__(self, name, value)
            return
        ident = ident_of.get(name)
        if ident is None:
            raise MQTTException(f"Property name must be one of {names.keys()}")
        if self.packetType not in table[ident][1]:
            raise MQTTException(f"Property {name} does not apply to packet type "
                                f"{PacketTypes.Names[self.packetType]}")
        if not isinstance(value, list):
            low_high = _RANGES.get(name)
            if low_high is not None and (value < low_high[0] or value > low_high[1]):
                raise MQTTException(f"{name} property value must be in the range {low_high[0]}-{low_high[1]}")
            if name in _BINARY and value != 0 and value != 1:
                raise MQTTException(f"{name} property value must be 0 or 1")
        if ident in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in vars(self):
                value = object.__getattribute__(self, name) + value
        object.__setattr__(self, name, value)

    ORIGINAL.update({m: Properties.__dict__[m] for m in PATCHED})
    type.__setattr__(Properties, "types", types)
    type.__setattr__(Properties, "names", names)
    type.__setattr__(Properties, "properties", table)
    for m, fn in (("__init__", __init__), ("__setattr__", __setattr__), ("getIdentFromName", getIdentFromName),
                  ("allowsMultiple", allowsMultiple), ("getNameFromIdent", getNameFromIdent),
                  ("clear", clear), ("isEmpty", isEmpty)):
        type.__setattr__(Properties, m, fn)
    return True


class PackedProperties(Properties):
    """PUBLISH properties (Message Expiry Interval, Response Topic, Correlation Data) encoded once,
    when made; immutable. paho only calls pack() on them; anything else asked of them is answered
    by an equal paho Properties (unpacked()).

    It calls paho's constructor, which after apply() only records the packet type; without it,
    paho builds its tables here as it does for any Properties object: correct, and the cost apply()
    exists to remove."""

    _args: tuple[str | None, bytes | None, int | None]
    _packed: bytes

    def __init__(self, response_topic: str | None = None, correlation: bytes | None = None,
                 expiry_s: int | None = None) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        expiry_s = None if expiry_s is None else max(1, int(expiry_s))
        body = b""
        if expiry_s is not None:
            body += b"\x02" + struct.pack("!I", expiry_s)
        if response_topic is not None:
            topic = response_topic.encode("utf-8")
            body += b"\x08" + struct.pack("!H", len(topic)) + topic
        if correlation is not None:
            body += b"\x09" + struct.pack("!H", len(correlation)) + bytes(correlation)
        object.__setattr__(self, "_args", (response_topic, correlation, expiry_s))
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(body)) + body)  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        return self._packed

    def unpacked(self) -> Properties:
        response_topic, correlation, expiry_s = self._args
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        return props

    def __setattr__(self, name: str, value: Any) -> None:
        if name.replace(" ", "") in _PRIVATE:  # paho's own constructor sets these
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"PackedProperties are immutable (packed when made); cannot set {name}: "
                             "make a new one, or a paho Properties")

    def __getattr__(self, name: str) -> Any:  # only for what the instance itself lacks: property values
        if name.startswith("__") or name in ("_args", "_packed"):
            raise AttributeError(name)
        return getattr(self.unpacked(), name)

    def isEmpty(self) -> bool:
        return self._packed == b"\x00"

    def clear(self) -> None:
        raise AttributeError("PackedProperties are immutable (packed when made)")

    def json(self) -> dict[str, Any]:
        return self.unpacked().json()  # type: ignore[no-untyped-call, no-any-return]

    def __str__(self) -> str:
        return str(self.unpacked())


__all__ = ["ORIGINAL", "PATCHED", "PackedProperties", "applied", "apply"]
