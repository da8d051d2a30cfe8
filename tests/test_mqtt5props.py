"""The faster paho Properties (fleet_common.mqtt5props) behaves as paho's own: every property
on every packet type, every refusal with the same message, and the same bytes on the wire."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import fleet_common.link  # noqa: F401  - installs the patch, as every component does
from fleet_common import mqtt5props

# paho's own class, as it was before the patch
Reference: Any = type("Reference", (), {**{k: v for k, v in vars(Properties).items()
                                           if k not in ("__dict__", "__weakref__")}, **mqtt5props.ORIGINAL})
VALUES: Dict[str, List[Any]] = {
          "Byte": [1, 0, 2], "Two Byte Integer": [10, 0, 70000], "Four Byte Integer": [100, 0, 2**31],
          "Variable Byte Integer": [5, 0, 268435456], "Binary Data": [b"ab"], "UTF-8 Encoded String": ["x/y"],
          "UTF-8 String Pair": [("k", "v")]}
PAHO_TABLES = {"types", "names", "properties"}  # paho's object holds its own copies; ours share the class's
PACKETS = [*range(PacketTypes.CONNECT, PacketTypes.AUTH + 1), PacketTypes.WILLMESSAGE]


def outcome(obj: Any, name: str, value: Any) -> Tuple[str, str]:
    try:
        setattr(obj, name, value)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def state(obj: Any) -> Tuple[Any, ...]:
    try:
        packed: Any = obj.pack()
    except Exception as exc:  # paho packs 70000 as a Two Byte Integer only to fail here
        packed = (type(exc).__name__, str(exc))
    return (packed, str(obj), obj.json(), obj.isEmpty())


def test_it_is_installed_by_the_link() -> None:
    assert mqtt5props.installed()
    assert Properties.__init__ is not mqtt5props.ORIGINAL["__init__"]


def test_every_property_on_every_packet_type_as_paho_does() -> None:
    names = list(Reference(PacketTypes.PUBLISH).names)
    compared = 0
    for packet in PACKETS:
        for name in names:
            compressed = name.replace(" ", "")
            ident = Reference(packet).names[name]
            kind = Reference(packet).types[Reference(packet).properties[ident][0]]
            for value in VALUES[kind]:
                ours: Any = Properties(packet)  # type: ignore[no-untyped-call]
                theirs = Reference(packet)
                assert outcome(ours, compressed, value) == outcome(theirs, compressed, value), (packet, name, value)
                assert state(ours) == state(theirs)
                if not theirs.isEmpty() and isinstance(state(theirs)[0], bytes):
                    back: Any = Properties(packet)  # type: ignore[no-untyped-call]
                    ref_back = Reference(packet)
                    assert back.unpack(theirs.pack())[1] == ref_back.unpack(theirs.pack())[1]
                    assert state(back) == state(ref_back)
                    assert vars(back) == {k: v for k, v in vars(ref_back).items() if k not in PAHO_TABLES}
                compared += 1
    assert compared > 300


def test_names_with_spaces_unknown_names_repeats_and_clear() -> None:
    def run(cls: Any) -> List[Any]:
        p = cls(PacketTypes.PUBLISH)
        out: List[Any] = [outcome(p, "Message Expiry Interval", 30), outcome(p, "NoSuchThing", 1),
                          outcome(p, "UserProperty", ("a", "1")), outcome(p, "UserProperty", [("b", "2")]),
                          outcome(p, "SubscriptionIdentifier", 7), outcome(p, "ResponseTopic", "r/t")]
        out += [state(p), p.getIdentFromName("UserProperty"), p.getIdentFromName("Nope"),
                p.allowsMultiple("UserProperty"), p.allowsMultiple("ResponseTopic"), p.getNameFromIdent(38),
                p.getNameFromIdent(99)]
        packed = p.pack()
        p.clear()
        out += [state(p), vars(p).keys() - PAHO_TABLES]
        q = cls(PacketTypes.PUBLISH)
        out += [q.unpack(packed)[1], state(q)]
        twice = cls(PacketTypes.PUBLISH)
        dup = b"\x0a" + (b"\x08\x00\x01a") * 2  # Response Topic twice: a protocol error
        out.append(outcome_of(lambda: twice.unpack(dup)))
        return out

    def outcome_of(fn: Any) -> Tuple[str, str]:
        try:
            fn()
        except Exception as exc:
            return type(exc).__name__, str(exc)
        return "ok", ""

    assert run(Properties) == run(Reference)


@pytest.mark.parametrize("packet", [PacketTypes.PUBLISH, PacketTypes.CONNECT])
def test_an_empty_object_packs_to_one_zero_byte(packet: int) -> None:
    assert Properties(packet).pack() == Reference(packet).pack() == b"\x00"  # type: ignore[no-untyped-call]
