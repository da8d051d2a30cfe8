"""Cheaper paho MQTT 5 Properties objects, with the same behaviour.

paho builds a `Properties` object for every MQTT 5 PUBLISH it receives, and its constructor
builds two 27-entry tables for that one object; `clear()`, `isEmpty()` and name lookups then scan
those tables by name. Profiled in the persister, that was 15 % of its time and more than
everything else paho does with a message; in the agent, a large part of answering a `ping`.

`install()` keeps paho's tables once, on the class, and replaces the scans with lookups in
maps built from those same tables. Packing, unpacking and every error message are paho's own
code. It changes nothing unless paho's class looks as expected (tested against paho's own
methods in tests/test_mqtt5props.py); `installed()` says whether it applied.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from paho.mqtt.exception import MQTTException  # what paho's Properties raises
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PATCHED = ("__init__", "__setattr__", "getIdentFromName", "allowsMultiple", "getNameFromIdent", "clear", "isEmpty")
ORIGINAL: Dict[str, Callable[..., Any]] = {}
_PRIVATE = frozenset(("packetType", "types", "names", "properties"))
_MULTIPLE = (11, 38)  # Subscription Identifier, User Property: what paho's allowsMultiple() lists
_RANGES = {"ReceiveMaximum": (1, 65535), "TopicAlias": (1, 65535), "TopicAliasMaximum": (0, 65535),
           "MaximumPacketSize": (1, 268435455), "SubscriptionIdentifier": (1, 268435455)}
_BINARY = ("RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator")


def installed() -> bool:
    return bool(ORIGINAL)


def install() -> bool:
    """Patch paho's Properties class once; False (and nothing changed) if it is not the one
    this was written against."""
    if ORIGINAL:
        return True
    try:
        template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        types, names, table = template.types, template.names, template.properties
        ident_of = {name.replace(" ", ""): ident for name, ident in names.items()}
        name_of: Dict[int, str] = {}
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


__all__ = ["ORIGINAL", "PATCHED", "install", "installed"]
