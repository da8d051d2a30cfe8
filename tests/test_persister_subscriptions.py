"""How the persister subscribes: its client id, plain or shared subscriptions, and what a session
kept by the broker holds when those settings change; a real Mosquitto (dev.conf) and real processes."""

from __future__ import annotations

import secrets
from typing import List

import paho.mqtt.client as mqtt
import pytest
from conftest import wait_for
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_common import ConfigError, load_config
from fleet_common.config import PersisterConfig
from fleet_persister.persister import client_id


def mqtt_client(port: int, cid: str, clean_start: bool = True) -> tuple:
    """A connected paho MQTT 5 client and its CONNACK's session_present flag."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    present: List[bool] = []
    c.on_connect = lambda client, userdata, flags, reason, props: present.append(flags.session_present)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=clean_start, properties=props)
    c.loop_start()
    wait_for(lambda: present, 10, what=f"CONNACK for {cid}")
    return c, present[0]


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
