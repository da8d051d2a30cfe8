"""How the persister subscribes: its client id, plain or shared subscriptions, and what a session
kept by the broker holds when those settings change; a real Mosquitto (dev.conf) and real processes."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from conftest import Procs, wait_for
from helpers import rows
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common import ConfigError, load_config
from fleet_common.config import PersisterConfig
from fleet_common.datatypes import example
from fleet_common.timefmt import now_iso
from fleet_persister.persister import client_id


def mqtt_client(port: int, cid: str, clean_start: bool = True) -> tuple:
    """A connected paho MQTT 5 client and its CONNACK's session_present flag."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    present: list[bool] = []
    c.on_connect = lambda client, userdata, flags, reason, props: present.append(flags.session_present)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
    c.loop_start()
    wait_for(lambda: present, 10, what=f"CONNACK for {cid}")
    return c, present[0]


def publish_answers(port: int, prefix: str, ids: list[str]) -> None:
    c, _ = mqtt_client(port, f"pub-{secrets.token_hex(4)}")
    try:
        for req_id in ids:
            payload = {"v": 1, "id": req_id, "agent_id": "host-r", "type": "cpu", "status": "ok",
                       "data": example("cpu", percent=1.0), "error": None, "collected_at": now_iso(),
                       "duration_ms": 1.0}
            c.publish(f"{prefix}/host-r/res/cpu", json.dumps(payload), qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def received_at_stop(procs: Procs, name: str) -> int:
    """What the persister counted as received, from the summary it logs when it stops."""
    assert procs.stop(name) == 0, f"{name} did not stop cleanly"
    found = re.findall(r"stopped: received (\d+),", procs.log(name))
    assert found, f"{name} logged no summary"
    return int(found[-1])


def test_persister_uses_mqtt_client_id(broker, write_config, procs) -> None:
    """With no persister.client_id the persister connects as mqtt.client_id: the broker holds a
    session under that id once it has stopped."""
    cid = f"cid-{secrets.token_hex(4)}"
    procs.start_persister(write_config("p", mqtt={"client_id": cid}))
    procs.stop("persister")
    c, present = mqtt_client(broker.port, cid, clean_start=False)
    c.disconnect()
    c.loop_stop()
    assert present, f"no session under {cid!r}: the persister connected with another client id"


def test_persister_client_id_precedence(tmp_path, monkeypatch) -> None:
    """persister.client_id wins over mqtt.client_id, which wins over the default made from the host name."""
    monkeypatch.chdir(tmp_path)  # no ./config.yaml
    both = load_config(None, env={"FLEET_MQTT_CLIENT_ID": "m", "FLEET_PERSISTER_CLIENT_ID": "p"})
    assert client_id(both) == "p"
    assert client_id(load_config(None, env={"FLEET_MQTT_CLIENT_ID": "m"})) == "m"
    assert client_id(load_config(None, env={})).startswith("persister-")


def test_share_group_is_required_secret_and_named_in_errors(tmp_path, monkeypatch) -> None:
    """Shared subscriptions are off by default; on, they need a share group of 16+ [A-Za-z0-9_-],
    and a missing or guessable one is a config error naming persister.share_group and how to make one."""
    monkeypatch.chdir(tmp_path)  # no ./config.yaml
    assert PersisterConfig().shared_subscription is False
    on = {"FLEET_PERSISTER_SHARED_SUBSCRIPTION": "true"}
    for group in (None, "persisters", "a" * 15, "has space in it 123", "dollar$dollar$dollar"):
        env = on if group is None else {**on, "FLEET_PERSISTER_SHARE_GROUP": group}
        with pytest.raises(ConfigError) as caught:
            load_config(None, env=env)
        assert caught.value.key == "persister.share_group" and "fleetctl add-user" in str(caught.value)
    good = secrets.token_urlsafe(18)
    assert load_config(None, env={**on, "FLEET_PERSISTER_SHARE_GROUP": good}).persister.share_group == good


@pytest.mark.slow
def test_switching_shared_subscription_on_a_resumed_session_delivers_once(broker, prefix, write_config, procs,
                                                                          tmp_path) -> None:
    """Plain to shared and back on one kept session: the persister receives each message once (its
    own count), what was queued while it was stopped included, and stores every one."""
    port, db, group = broker.port, tmp_path / "fleet.db", secrets.token_urlsafe(18)
    base = {"client_id": f"resume-{secrets.token_hex(3)}"}
    plain = write_config("plain", persister={**base, "shared_subscription": False})
    shared = write_config("shared", persister={**base, "shared_subscription": True, "share_group": group})
    # back to plain: the group stays named for a run so the session can leave it
    plain_again = write_config("plain-again", persister={**base, "shared_subscription": False, "share_group": group})

    def stored(n: int) -> Callable[[], Any]:
        return lambda: len(rows(db, "select id from requests where id like 'sw-%'")) >= n

    procs.start_persister(plain, "p1")
    publish_answers(port, prefix, [f"sw-a{i}" for i in range(10)])
    wait_for(stored(10), 30, what="the first answers stored")
    assert received_at_stop(procs, "p1") == 10
    total = 10
    for name, cfg in (("p2", shared), ("p3", plain_again)):
        publish_answers(port, prefix, [f"sw-q{name}{i}" for i in range(20)])  # queued in the kept session
        procs.start_persister(cfg, name)  # ready: subscribed, and the old subscriptions left
        assert "left the subscriptions of other settings" in procs.log(name)
        publish_answers(port, prefix, [f"sw-b{name}{i}" for i in range(20)])
        total += 40
        wait_for(stored(total), 30, what=f"every answer stored by {name}")
        assert received_at_stop(procs, name) == 40, procs.log(name)
    assert len(rows(db, "select id from requests where id like 'sw-%'")) == total
