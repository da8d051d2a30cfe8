"""fleet_common.compat, paho's internals worked around for speed: applied only when asked (each
service's main()), it behaves as paho's own (every property on every packet type, every refusal
with the same message, the same bytes on the wire), and these tests fail if paho changes what the
workarounds rely on."""

from __future__ import annotations

import inspect
import re
import socket
import subprocess
import sys
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common import compat
from fleet_common.compat import PackedProperties

assert compat.apply(), "paho's Properties is not the class fleet_common.compat was written for"  # conftest did
# paho's own class, as it was before apply()
Reference: Any = type("Reference", (), {**{k: v for k, v in vars(Properties).items()
                                           if k not in ("__dict__", "__weakref__")}, **compat.ORIGINAL})
VALUES: dict[str, list[Any]] = {
          "Byte": [1, 0, 2], "Two Byte Integer": [10, 0, 70000], "Four Byte Integer": [100, 0, 2**31],
          "Variable Byte Integer": [5, 0, 268435456], "Binary Data": [b"ab"], "UTF-8 Encoded String": ["x/y"],
          "UTF-8 String Pair": [("k", "v")]}
PAHO_TABLES = {"types", "names", "properties"}  # paho's object holds its own copies; ours share the class's
PACKETS = [*range(PacketTypes.CONNECT, PacketTypes.AUTH + 1), PacketTypes.WILLMESSAGE]


def outcome(obj: Any, name: str, value: Any) -> tuple[str, str]:
    try:
        setattr(obj, name, value)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def state(obj: Any) -> tuple[Any, ...]:
    try:
        packed: Any = obj.pack()
    except Exception as exc:  # paho packs 70000 as a Two Byte Integer only to fail here
        packed = (type(exc).__name__, str(exc))
    return (packed, str(obj), obj.json(), obj.isEmpty())


def run_python(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_importing_any_component_changes_nothing_in_paho() -> None:
    """Only apply() patches paho: importing every service's modules leaves its Properties class as it was."""
    run_python("import fleet_common.link, fleet_controller.controller, fleet_persister.persister, "
               "fleet_agent.agent, fleetctl.request, fleet_sim.fleet, fleet_dashboard.app\n"
               "from paho.mqtt.properties import Properties\n"
               "from fleet_common import compat\n"
               "assert not compat.applied() and 'types' not in vars(Properties)\n"
               "assert Properties.__init__.__module__ == 'paho.mqtt.properties'\n")


@pytest.mark.parametrize("main", ["fleet_controller.cli", "fleet_persister.cli", "fleet_agent.cli", "fleetctl.cli",
                                  "fleet_sim.cli", "fleet_dashboard.cli"])
def test_every_service_applies_it_from_main(main: str) -> None:
    module = __import__(main, fromlist=["main"])
    source = inspect.getsource(module.main)
    names = {n for n, v in vars(module).items() if v is compat}  # fleet_common.compat, not the agent's own
    names |= set(re.findall(r"from fleet_common import compat as (\w+)", source))
    assert any(f"{n}.apply()" in source for n in names), f"{main}.main() does not call fleet_common.compat.apply()"


def test_paho_properties_still_has_what_apply_relies_on() -> None:
    """paho's constructor builds the tables apply() keeps on the class, and has the methods it replaces;
    when a paho release changes that, apply() refuses (the services run unpatched) and this fails."""
    assert compat.applied() and Properties.__init__ is not compat.ORIGINAL["__init__"]
    theirs = Reference(PacketTypes.PUBLISH)
    assert {"packetType", "types", "names", "properties"} <= set(vars(theirs))
    assert (theirs.types, theirs.names, theirs.properties) == (Properties.types, Properties.names,
                                                               Properties.properties)
    assert set(compat.PATCHED) <= set(compat.ORIGINAL)
    assert [n for n, i in theirs.names.items() if theirs.allowsMultiple(n.replace(" ", ""))] == [
        "Subscription Identifier", "User Property"]  # compat._MULTIPLE


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
    def run(cls: Any) -> list[Any]:
        p = cls(PacketTypes.PUBLISH)
        out: list[Any] = [outcome(p, "Message Expiry Interval", 30), outcome(p, "NoSuchThing", 1),
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

    def outcome_of(fn: Any) -> tuple[str, str]:
        try:
            fn()
        except Exception as exc:
            return type(exc).__name__, str(exc)
        return "ok", ""

    assert run(Properties) == run(Reference)


@pytest.mark.parametrize("packet", [PacketTypes.PUBLISH, PacketTypes.CONNECT])
def test_an_empty_object_packs_to_one_zero_byte(packet: int) -> None:
    assert Properties(packet).pack() == Reference(packet).pack() == b"\x00"  # type: ignore[no-untyped-call]


PACKED_ARGS = [("fleet/web-01/res/cpu", b"0123456789abcdef" * 2, 60), (None, b"x", None), ("t" * 300, None, 3600),
               (None, None, 0), ("caf\u00e9/r", b"", 2**31), (None, None, None)]


def paho_publish_properties(response_topic: Any, correlation: Any, expiry_s: Any) -> Any:
    """What paho's own class (unpatched) makes of the same values."""
    props = Reference(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, expiry_s)
    return props


@pytest.mark.parametrize("args", PACKED_ARGS)
def test_packed_properties_are_the_bytes_and_values_paho_has(args: tuple[Any, Any, Any]) -> None:
    ours, theirs = PackedProperties(*args), paho_publish_properties(*args)
    assert ours.pack() == theirs.pack()
    assert (str(ours), ours.json(), ours.isEmpty()) == (str(theirs), theirs.json(), theirs.isEmpty())
    for name in ("ResponseTopic", "CorrelationData", "MessageExpiryInterval", "ContentType"):
        assert hasattr(ours, name) == hasattr(theirs, name)
        if hasattr(theirs, name):
            assert getattr(ours, name) == getattr(theirs, name)


@pytest.mark.parametrize("change", [lambda p: setattr(p, "ResponseTopic", "x"), lambda p: p.clear(),
                                    lambda p: p.unpack(b"\x00")])
def test_packed_properties_refuse_to_change(change: Callable[[Any], Any]) -> None:
    """Packed when made: a change would not reach the wire, so it fails instead."""
    with pytest.raises(AttributeError, match="immutable"):
        change(PackedProperties("r/t", b"id", 5))


class Counting(PackedProperties):
    unpacked_calls = 0

    def unpacked(self) -> Properties:
        Counting.unpacked_calls += 1
        return super().unpacked()


def sent_publish(properties: Any) -> bytes:
    """The PUBLISH packet a paho client writes to its socket with these properties."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="compat", protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", server.getsockname()[1])  # writes CONNECT, without waiting for CONNACK
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            connect = conn.recv(65536)
            assert connect[:1] == b"\x10"
            client.publish("a/b", b"xy", qos=0, properties=properties)
            packet = conn.recv(65536)
        client.socket().close()
    return packet


def test_paho_sends_what_pack_returns_and_asks_nothing_else() -> None:
    """paho's client calls only pack() on the properties of a PUBLISH it sends, and the packet is
    byte for byte the one it sends with its own Properties object."""
    Counting.unpacked_calls = 0
    packet = sent_publish(Counting("fleet/web-01/res/cpu", b"id-1", 60))
    assert Counting.unpacked_calls == 0
    assert packet == sent_publish(paho_publish_properties("fleet/web-01/res/cpu", b"id-1", 60))
    assert packet[:1] == b"\x30"  # PUBLISH, QoS 0


def test_without_apply_everything_works_as_paho_only_slower() -> None:
    """A program that never calls apply() (a library user, a script) gets paho's own class and
    PackedProperties built through paho's own constructor: the same bytes and values."""
    run_python("from paho.mqtt.packettypes import PacketTypes\n"
               "from paho.mqtt.properties import Properties\n"
               "from fleet_common import compat\n"
               "from fleet_common.config import MqttConfig\n"
               "from fleet_common.link import Link, publish_properties\n"
               "ours = publish_properties('r/t', b'id', 5)\n"
               "theirs = Properties(PacketTypes.PUBLISH)\n"
               "theirs.ResponseTopic = 'r/t'; theirs.CorrelationData = b'id'; theirs.MessageExpiryInterval = 5\n"
               "assert ours.pack() == theirs.pack() and str(ours) == str(theirs) and not ours.isEmpty()\n"
               "assert ours.packetType == PacketTypes.PUBLISH and 'names' in vars(ours)\n"
               "assert Link(MqttConfig(), 'x')._connect_properties().pack()\n"
               "assert not compat.applied()\n")
