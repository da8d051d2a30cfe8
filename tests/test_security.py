"""The production broker (broker_config/prod.conf): TLS, passwords, per-agent ACLs and the
provisioning commands, against a real Mosquitto on free ports with files in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import BIN, ROOT, wait_for
from helpers import loads, rows
from paho.mqtt.enums import CallbackAPIVersion

from fleet_common import BUILTIN_TYPES, load_config
from fleet_common.brokerwatch import TOPICS as BROKER_TOPICS
from fleet_common.config import MqttConfig, TlsConfig
from fleet_common.datatypes import example
from fleet_common.link import Link
from fleet_common.timefmt import now_iso
from fleet_common.topics import SHARE_GROUP, Topics
from fleetctl.broker import EmbeddedBroker, find_mosquitto, free_port
from fleetctl.provision import BrokerFiles, check_password, read_passwd, render_acl, render_prod_config

PROD_CONF = ROOT / "broker_config" / "prod.conf"
SERVICE_USERS = {"controller-1": "controller", "persister-1": "persister", "operator-1": "operator"}
AGENTS = ("host-a", "host-b")
QUIET_S = 1.5  # how long a negative check waits after its positive twin has been seen
NOT_AUTHORIZED = 135


@pytest.fixture(autouse=True, scope="module")
def _empty_cwd(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fleetctl reads ./config.yaml when present; run it where there is none."""
    global FLEETCTL_CWD
    FLEETCTL_CWD = tmp_path_factory.mktemp("cwd")


FLEETCTL_CWD: Path | None = None


def fleetctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "fleetctl"), *args], capture_output=True, text=True, timeout=60,
                          cwd=FLEETCTL_CWD)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@dataclass
class SecureBroker:
    files: BrokerFiles
    tls_port: int
    plain_port: int
    pid_file: Path
    prefix: str
    tmp: Path
    broker: EmbeddedBroker | None = None

    @property
    def ca_file(self) -> Path:
        return self.files.certs / "ca.crt"

    def provision(self, command: str, name: str, *extra: str, reload: bool = True) -> subprocess.CompletedProcess:
        """Run a fleetctl provisioning command against this broker's files."""
        args = [command, name, "--broker-dir", str(self.files.root), "--prefix", self.prefix, *extra]
        args += ["--pid-file", str(self.pid_file)] if reload else ["--no-reload"]
        if command.startswith("add-"):
            args += ["--broker-host", "127.0.0.1", "--broker-port", str(self.tls_port),
                     "--out", str(self.tmp / f"{name}.yaml")]
        return fleetctl(*args)

    def user_config(self, name: str) -> dict[str, Any]:
        return yaml.safe_load((self.tmp / f"{name}.yaml").read_text())

    def password(self, name: str) -> str:
        return str(self.user_config(name)["mqtt"]["password"])

    def config(self, name: str, file: str = "", drop_password: bool = False, **sections: dict[str, Any]) -> Path:
        """The config add-user/add-agent wrote for `name`, plus test settings, as a new file."""
        data = self.user_config(name)
        if drop_password:
            del data["mqtt"]["password"]
        data["mqtt"].update(reconnect_min_s=0.2, reconnect_max_s=2)
        data.setdefault("persister", {}).update(sqlite_path=str(self.tmp / "fleet.db"), batch_wait_s=0.05,
                                                sweep_interval_s=0.5, expire_grace_s=0.5,
                                                heartbeat_path=str(self.tmp / f"{file or name}-persister.json"))
        data.setdefault("controller", {}).update(heartbeat_path=str(self.tmp / f"{file or name}-controller.json"))
        data.setdefault("agent", {}).update(outbox_path=str(self.tmp / f"{name}-outbox.db"))
        data["log"] = {"level": "debug"}
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        path = self.tmp / f"{file or name}-run.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture
def secure(tmp_path: Path, prefix: str) -> Iterator[SecureBroker]:
    """A Mosquitto running prod.conf on free ports, with certificates from `fleetctl make-certs`
    and users from `fleetctl add-user` / `add-agent` (one per role, two agents)."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; run 'make test', which installs it")
    files = BrokerFiles.under(tmp_path / "broker-etc")
    data_dir = tmp_path / "broker"
    sb = SecureBroker(files, free_port(), free_port(), data_dir / "mosquitto.pid", prefix, tmp_path)
    fleetctl("make-certs", str(files.certs))
    for name, role in SERVICE_USERS.items():
        sb.provision("add-user", name, "--role", role, reload=False)
    for agent in AGENTS:
        sb.provision("add-agent", agent, reload=False)
    data_dir.mkdir()
    rendered = tmp_path / "prod-rendered.conf"
    rendered.write_text(render_prod_config(PROD_CONF, files, data_dir.resolve(), sb.tls_port, sb.plain_port,
                                           sb.pid_file))
    log = open(tmp_path / "mosquitto.log", "wb")
    sb.broker = EmbeddedBroker(rendered, sb.tls_port, data_dir, log=log)
    sb.broker.start()
    wait_for(lambda: sb.pid_file.exists(), 5, what="the broker's pid file")
    yield sb
    sb.broker.stop()
    log.close()


class Client:
    """A bare paho MQTT 5 client that records its CONNACK, messages and PUBACK reason codes."""

    def __init__(self, sb: SecureBroker, user: str | None, password: str | None = None, *,
                 tls: bool = True, ca_file: Path | None = None, port: int | None = None) -> None:
        self.connack: int | None = None
        self.closed = threading.Event()
        self.answered = threading.Event()
        self.messages: list[mqtt.MQTTMessage] = []
        self.got = threading.Event()
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{user}", protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, password if password is not None else sb.password(user))
        if tls:
            c.tls_set(ca_certs=str(ca_file or sb.ca_file))
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: (self.closed.set(), self.answered.set())
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self.subscribed.set()
        self.client = c
        self.port = port or (sb.tls_port if tls else sb.plain_port)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason.value
        self.answered.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.append(msg)
        self.got.set()

    def connect(self) -> int | None:
        """Connect and wait for the broker's verdict: the CONNACK reason code, or None if it hung up."""
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.answered.wait(10), "the broker neither answered nor closed the connection"
        return self.connack

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (135: refused by the ACL; 16: accepted,
        but nobody is subscribed)."""
        codes: list[int] = []
        done = threading.Event()

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            codes.append(reason.value)
            done.set()

        self.client.on_publish = on_publish
        self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)
        assert done.wait(5), f"no PUBACK for {topic}"
        return codes[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connected(made: list[Client], sb: SecureBroker, user: str, **kw: Any) -> Client:
    c = Client(sb, user, **kw)
    made.append(c)
    assert c.connect() == 0, f"{user} could not connect"
    return c


def request(req_id: str) -> dict[str, Any]:
    return {"id": req_id, "type": "cpu"}


def response(req_id: str, agent: str) -> dict[str, Any]:
    return {"v": 1, "id": req_id, "agent_id": agent, "type": "cpu", "status": "ok", "data": example("cpu", percent=1.0),
            "error": None, "collected_at": now_iso(), "duration_ms": 1.0}


# ----------------------------------------------------------------------------- authentication

def test_anonymous_and_wrong_password_are_refused_on_both_listeners(secure, clients) -> None:
    """Without a user name, or with a wrong password, the broker refuses the connection on the TLS
    and on the localhost listener, while the right password is accepted on both."""
    for tls, user in ((True, "host-a"), (False, "host-b")):  # one connection per user name
        connected(clients, secure, user, tls=tls)
        anonymous = Client(secure, None, tls=tls)
        clients.append(anonymous)
        assert anonymous.connect() == NOT_AUTHORIZED
        wrong = Client(secure, user, "not-the-password", tls=tls)
        clients.append(wrong)
        assert wrong.connect() == NOT_AUTHORIZED


def test_revoked_agent_is_cut_off_and_cannot_reconnect(secure, clients) -> None:
    """add-agent on a running broker works at once (reload by pid file); remove-agent reloads it,
    which disconnects the agent's live connection and refuses its next one."""
    secure.provision("add-agent", "host-c")
    live = connected(clients, secure, "host-c")  # proves the reload took the new entry
    password = secure.password("host-c")
    done = secure.provision("remove-agent", "host-c")
    assert "reloaded the broker" in done.stderr
    assert "host-c" not in read_passwd(secure.files.passwd)
    assert live.closed.wait(10), "the revoked agent's connection was not closed"
    again = Client(secure, "host-c", password)
    clients.append(again)
    assert again.connect() == NOT_AUTHORIZED


# ----------------------------------------------------------------------------- authorisation

def test_agent_cannot_read_another_agents_requests(secure, clients) -> None:
    """Agent A, subscribed to B's requests directly, by wildcard, and through the persisters'
    shared subscription, receives nothing of a request that B itself receives."""
    p = secure.prefix
    snoop = connected(clients, secure, "host-a")
    snoop.subscribe(f"{p}/host-b/req/+", f"{p}/+/req/+", f"{p}/#", f"$share/persisters/{p}/+/req/+")
    owner = connected(clients, secure, "host-b")
    owner.subscribe(f"{p}/host-b/req/+")
    operator = connected(clients, secure, "operator-1")
    assert operator.publish(f"{p}/host-b/req/cpu", request("for-b")) == 0
    assert owner.got.wait(5), "host-b did not receive its own request"
    assert json.loads(owner.messages[0].payload)["id"] == "for-b"
    assert not snoop.got.wait(QUIET_S), [m.topic for m in snoop.messages]


def test_agent_cannot_impersonate_another_agent_or_send_requests(secure, clients, procs) -> None:
    """The broker refuses A's responses and status under B's topics and any request from A; the
    persister (prod config) rejects A's payload naming B, so the store holds nothing as B."""
    p, db = secure.prefix, secure.tmp / "fleet.db"
    procs.start("persister", "fleet-persister", "--config", str(secure.config("persister-1")))
    a = connected(clients, secure, "host-a")
    # A's own retained status is allowed; once stored, the persister's subscriptions are in place.
    assert a.publish(f"{p}/host-a/status", {"v": 1, "agent_id": "host-a", "online": True}, retain=True) in (0, 16)
    wait_for(lambda: rows(db, "select agent_id from agents"), 30, what="the persister storing A's status")
    assert a.publish(f"{p}/host-b/res/cpu", response("forged-res", "host-b")) == NOT_AUTHORIZED
    assert a.publish(f"{p}/host-b/status", {"v": 1, "agent_id": "host-b", "online": True},
                     retain=True) == NOT_AUTHORIZED
    assert a.publish(f"{p}/host-b/req/cpu", request("forged-req-b")) == NOT_AUTHORIZED
    assert a.publish(f"{p}/host-a/req/cpu", request("forged-req-a")) == NOT_AUTHORIZED
    # Allowed by the broker (its own topic) but naming B in the payload: the persister must reject it.
    assert a.publish(f"{p}/host-a/res/cpu", response("forged-payload", "host-b")) == 0
    assert a.publish(f"{p}/host-a/res/cpu", response("marker", "host-a")) == 0  # sent last, stored last

    wait_for(lambda: rows(db, "select * from requests where id='marker' and agent_id='host-a'"), 30,
             what="A's own response stored")
    rejected = rows(db, "select topic, reason from rejected")
    assert rejected == [{"topic": f"{p}/host-a/res/cpu", "reason": "agent_id_mismatch"}], rejected
    assert rows(db, "select id from requests where agent_id='host-b' or id like 'forged%'") == []
    assert [r["agent_id"] for r in rows(db, "select agent_id from agents")] == ["host-a"]
    watcher = connected(clients, secure, "operator-1")
    watcher.subscribe(f"{p}/+/status")
    assert watcher.got.wait(5), "A's own retained status is missing"
    time.sleep(QUIET_S)  # a forged retained status would arrive with A's, in the same burst
    assert [m.topic for m in watcher.messages] == [f"{p}/host-a/status"]


def test_service_roles_get_what_they_need_and_no_more(secure, clients) -> None:
    """The persister reads requests through its shared subscription but cannot publish; the
    controller can ask but cannot read answers; the operator can ask and read the answer."""
    p = secure.prefix
    persister = connected(clients, secure, "persister-1")
    persister.subscribe(f"$share/persisters/{p}/+/req/+", f"$share/persisters/{p}/+/res/+")
    controller = connected(clients, secure, "controller-1")
    controller.subscribe(f"{p}/+/res/+")
    operator = connected(clients, secure, "operator-1")
    operator.subscribe(f"{p}/host-b/res/+")
    agent = connected(clients, secure, "host-b")

    assert controller.publish(f"{p}/host-b/req/cpu", request("from-controller")) == 0
    assert persister.publish(f"{p}/host-b/req/cpu", request("from-persister")) == NOT_AUTHORIZED
    assert persister.publish(f"{p}/host-b/res/cpu", response("x", "host-b")) == NOT_AUTHORIZED
    assert controller.publish(f"{p}/host-b/res/cpu", response("y", "host-b")) == NOT_AUTHORIZED
    assert agent.publish(f"{p}/host-b/res/cpu", response("from-controller", "host-b")) == 0
    assert operator.got.wait(5), "the operator did not get the agent's answer"
    wait_for(lambda: len(persister.messages) >= 2, 5, what="the persister got the request and the answer")
    assert sorted(m.topic for m in persister.messages) == [f"{p}/host-b/req/cpu", f"{p}/host-b/res/cpu"]
    assert not controller.got.wait(QUIET_S), "the controller read an answer"


def test_only_the_persister_and_controller_read_the_brokers_drop_counts(secure, clients) -> None:
    """The $SYS topics the persister and the controller follow (fleet_common.brokerwatch) are theirs
    to read: its retained $SYS/broker/version reaches them, and no agent or operator."""
    readers = {name: connected(clients, secure, name) for name in ("persister-1", "controller-1")}
    others = {name: connected(clients, secure, name) for name in ("operator-1", "host-a")}
    for c in [*readers.values(), *others.values()]:
        c.subscribe(*BROKER_TOPICS)
    for name, c in readers.items():
        assert c.got.wait(5), f"{name} did not get $SYS/broker/version"
        assert {m.topic for m in c.messages} >= {"$SYS/broker/version"}
    for name, c in others.items():
        assert not c.got.wait(QUIET_S), f"{name} read {c.messages[0].topic}"


def test_service_users_cannot_pose_as_agents(secure, clients, procs) -> None:
    """Controller, persister and operator users get PUBACK 135 for a retained status and an answer under
    their own name and under a real agent's, and a running persister stores no phantom agent or answer."""
    p, db = secure.prefix, secure.tmp / "fleet.db"
    secure.provision("add-user", "persister-2", "--role", "persister")  # persister-1 is the running one
    procs.start_persister(secure.config("persister-1"))
    for name in ("controller-1", "persister-2", "operator-1"):
        forger = connected(clients, secure, name)
        for who in (name, "host-a"):
            status = {"v": 1, "agent_id": who, "online": True, "types": ["cpu"]}
            assert forger.publish(f"{p}/{who}/status", status, retain=True) == NOT_AUTHORIZED, (name, who)
            assert forger.publish(f"{p}/{who}/res/cpu", response(f"forged-{name}-{who}", who)) == NOT_AUTHORIZED, \
                (name, who)
    agent = connected(clients, secure, "host-a")
    assert agent.publish(f"{p}/host-a/res/cpu", response("marker", "host-a")) == 0  # sent last, stored last
    wait_for(lambda: rows(db, "select id from requests where id='marker'"), 30, what="the real agent's answer stored")
    assert rows(db, "select id from requests where id like 'forged%'") == []
    assert rows(db, "select agent_id from agents") == [{"agent_id": "host-a"}]  # known by its answer
    assert rows(db, "select * from rejected") == []
    watcher = connected(clients, secure, "controller-1")
    watcher.subscribe(f"{p}/+/status")
    assert not watcher.got.wait(QUIET_S), [m.topic for m in watcher.messages]  # no phantom's retained status


def test_service_users_receive_no_requests_addressed_to_their_name(secure, clients) -> None:
    """A request to a service user's name reaches no one: not the controller, persister or operator of
    that name (the agent patterns would let them read it), while an agent gets its own."""
    p = secure.prefix
    secure.provision("add-user", "persister-2", "--role", "persister")
    targets = {name: connected(clients, secure, name) for name in ("controller-1", "persister-2", "operator-1")}
    for name, target in targets.items():
        target.subscribe(f"{p}/{name}/req/+")
    agent = connected(clients, secure, "host-a")
    agent.subscribe(f"{p}/host-a/req/+")
    for name in targets:  # each sent by a user allowed to send requests other than the target itself
        sender = targets["operator-1" if name != "operator-1" else "controller-1"]
        assert sender.publish(f"{p}/{name}/req/cpu", request(f"to-{name}")) in (0, 16)
    assert targets["operator-1"].publish(f"{p}/host-a/req/cpu", request("to-host-a")) == 0
    assert agent.got.wait(5), "the agent did not receive its own request"
    time.sleep(QUIET_S)
    for name, target in targets.items():
        assert target.messages == [], (name, [m.topic for m in target.messages])


def test_rewrite_acl_upgrades_an_old_acl_that_list_users_points_out(secure, clients) -> None:
    """An ACL written by an older fleetctl (no deny lines) lets operator-1 pose as an agent; list-users
    says in one line to run rewrite-acl, which regenerates the file and reloads the running broker."""
    p, acl = secure.prefix, secure.files.acl
    current = acl.read_text()
    acl.write_text("".join(line for line in current.splitlines(True) if not line.startswith("topic deny")))
    os.kill(int(secure.pid_file.read_text()), signal.SIGHUP)
    opts = ["--broker-dir", str(secure.files.root), "--prefix", p]
    listed = fleetctl("list-users", *opts)
    notes = [line for line in listed.stderr.splitlines() if "rewrite-acl" in line]
    assert len(notes) == 1 and str(acl) in notes[0], listed.stderr
    operator = connected(clients, secure, "operator-1")
    status = {"v": 1, "agent_id": "operator-1", "online": True}
    wait_for(lambda: operator.publish(f"{p}/operator-1/status", status) in (0, 16), 5, what="the old ACL loaded")

    done = fleetctl("rewrite-acl", *opts, "--pid-file", str(secure.pid_file))
    assert "reloaded the broker" in done.stderr and acl.read_text() == current
    assert "rewrite-acl" not in fleetctl("list-users", *opts).stderr
    wait_for(lambda: operator.publish(f"{p}/operator-1/status", status) == NOT_AUTHORIZED, 5,
             what="the rewritten ACL refusing operator-1's status")


# ----------------------------------------------------------------------------- shared-subscription hijack

HIJACK_ANSWERS = 60


def plain_persister_config(sb: SecureBroker, name: str) -> Path:
    """The config add-user wrote for persister `name`, without its share settings: the default."""
    path = sb.config(name, file=f"{name}-plain")
    data = yaml.safe_load(path.read_text())
    for key in ("shared_subscription", "share_group"):
        del data["persister"][key]
    path.write_text(yaml.safe_dump(data))
    return path


def answers_stored_under_hijack(sb: SecureBroker, made: list[Client], group: str) -> int:
    """Agent host-a joins share group `group` on the persisters' filters (and subscribes to everything)
    while host-b and host-c publish HIJACK_ANSWERS answers; returns how many of them were stored."""
    p, db = sb.prefix, sb.tmp / "fleet.db"
    attacker = connected(made, sb, "host-a")
    attacker.subscribe(Topics.shared(f"{p}/+/res/+", group), Topics.shared(f"{p}/+/req/+", group), f"{p}/#")
    senders = [connected(made, sb, agent) for agent in ("host-b", "host-c")]
    for i in range(HIJACK_ANSWERS):
        agent = ("host-b", "host-c")[i % 2]
        assert senders[i % 2].publish(f"{p}/{agent}/res/cpu", response(f"hj-{i}", agent)) == 0

    def stored() -> int:
        return len(rows(db, "select id from requests where id like 'hj-%'"))

    last, since = -1, time.monotonic()
    while time.monotonic() - since < QUIET_S * 2 and stored() < HIJACK_ANSWERS:  # until it stops growing
        if stored() != last:
            last, since = stored(), time.monotonic()
        time.sleep(0.1)
    assert attacker.messages == [], "the agent read what is not its own"
    return stored()


def test_hijacked_share_group_loses_nothing_with_plain_persister(secure, clients, procs) -> None:
    """An agent on $share/persisters/... (the old fixed group) cannot make the default, plain persister
    miss an answer: every one of them is stored."""
    secure.provision("add-agent", "host-c")
    procs.start_persister(plain_persister_config(secure, "persister-1"))
    assert answers_stored_under_hijack(secure, clients, SHARE_GROUP) == HIJACK_ANSWERS


def test_hijacked_share_group_loses_nothing_with_secret_group(secure, clients, procs) -> None:
    """Two persisters on the secret share group add-user gives them split the answers and store every
    one, while an agent on $share/persisters/... gets none of them to drop."""
    secure.provision("add-agent", "host-c")
    secure.provision("add-user", "persister-2", "--role", "persister")
    group = secure.user_config("persister-1")["persister"]["share_group"]
    assert secure.user_config("persister-2")["persister"]["share_group"] == group and len(group) >= 16
    for name in ("persister-1", "persister-2"):
        procs.start_persister(secure.config(name), name)
    assert answers_stored_under_hijack(secure, clients, SHARE_GROUP) == HIJACK_ANSWERS
    for name in ("persister-1", "persister-2"):
        assert "committed a batch" in procs.log(name), f"{name} stored nothing: the share was not split"


def test_hijack_by_an_agent_that_knows_the_group_loses_answers(secure, clients, procs) -> None:
    """The limit of the guard: an agent that knows the secret group takes a share of the answers and
    Mosquitto 2.0.11 drops them (it cannot read them), so the group must stay secret."""
    secure.provision("add-agent", "host-c")
    secure.provision("add-user", "persister-2", "--role", "persister")
    for name in ("persister-1", "persister-2"):
        procs.start_persister(secure.config(name), name)
    group = secure.user_config("persister-1")["persister"]["share_group"]
    stored = answers_stored_under_hijack(secure, clients, group)
    assert 0 < stored < HIJACK_ANSWERS, stored


# ----------------------------------------------------------------------------- TLS

def test_tls_verifies_the_broker_and_refuses_plain_mqtt(secure, clients, tmp_path) -> None:
    """A client trusting the private CA connects; one using the system CAs (Link with tls on and no
    ca_file) or another CA fails verification; plain MQTT on the TLS port gets no CONNACK."""
    connected(clients, secure, "host-a")
    untrusting = Link(MqttConfig(host="127.0.0.1", port=secure.tls_port, username="host-a",
                                 password=secure.password("host-a"), tls=TlsConfig(enabled=True)), "host-a")
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.client.connect("127.0.0.1", secure.tls_port)
    fleetctl("make-certs", str(tmp_path / "other-ca"))
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(secure, "host-a", ca_file=tmp_path / "other-ca" / "ca.crt").client.connect("127.0.0.1",
                                                                                         secure.tls_port)
    plain = Client(secure, "host-a", tls=False, port=secure.tls_port)
    clients.append(plain)
    assert plain.connect() is None and plain.closed.is_set()


def test_make_certs_names_the_host_and_keeps_keys_private(tmp_path) -> None:
    """make-certs puts --host, localhost and 127.0.0.1 in the server certificate, writes keys with
    mode 0600, and on a second run keeps the CA and adds an agent certificate signed by it."""
    out = tmp_path / "certs"
    fleetctl("make-certs", str(out), "--host", "broker.example.com", "--host", "10.0.0.5")
    text = subprocess.run(["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True).stdout
    for name in ("DNS:broker.example.com", "IP Address:10.0.0.5", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in text
    ca = (out / "ca.crt").read_bytes()
    done = fleetctl("make-certs", str(out), "--agent", "host-a")
    assert "kept" in done.stdout and (out / "ca.crt").read_bytes() == ca
    for key in ("ca.key", "server.key", "agents/host-a.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt"),
                    str(out / "agents" / "host-a.crt")], check=True, capture_output=True)


# ----------------------------------------------------------------------------- provisioning

def test_add_agent_writes_a_private_config_and_never_shows_the_password(tmp_path) -> None:
    """add-agent --out writes a 0600 config whose password matches the passwd entry and appears on
    neither stdout nor stderr; mistakes end in one plain line and exit code 2."""
    etc, out = tmp_path / "etc", tmp_path / "web-01.yaml"
    done = fleetctl("add-agent", "web-01", "--broker-dir", str(etc), "--no-reload", "--out", str(out),
                    "--broker-host", "broker.example.com")
    cfg = yaml.safe_load(out.read_text())
    password = cfg["mqtt"]["password"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert password not in done.stdout + done.stderr
    assert check_password(password, read_passwd(etc / "passwd")["web-01"])
    assert cfg["agent"]["id"] == cfg["mqtt"]["username"] == "web-01"
    assert cfg["mqtt"]["tls"] == {"enabled": True, "ca_file": str((etc / "certs" / "ca.crt").resolve())}
    assert (cfg["mqtt"]["host"], cfg["mqtt"]["port"]) == ("broker.example.com", 8883)
    for args, says in ((["add-agent", "web-01"], "already exists"), (["remove-agent", "nobody"], "no agent"),
                       (["add-user", "web-01", "--role", "operator"], "is an agent"),
                       (["add-agent", "bad/name"], "not a valid name")):
        bad = fleetctl(*args, "--broker-dir", str(etc), "--no-reload", check=False)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_bad_prefix_writes_nothing(tmp_path) -> None:
    """add-agent and add-user with an invalid --prefix fail in one line and leave passwd, acl and
    roles.yaml as they were (no password line for a password never shown), and make no broker folder."""
    etc, out, fresh = tmp_path / "etc", tmp_path / "new.yaml", tmp_path / "fresh"
    fleetctl("add-user", "ops-1", "--role", "operator", "--broker-dir", str(etc), "--no-reload")
    fleetctl("add-agent", "web-01", "--broker-dir", str(etc), "--no-reload")
    before = {f.name: f.read_bytes() for f in etc.iterdir() if f.is_file()}
    commands = (["add-agent", "web-02"], ["add-agent", "web-01", "--rotate"],
                ["add-user", "ops-2", "--role", "operator"], ["add-user", "ops-1", "--role", "operator", "--rotate"])
    for args in commands:
        for bad in ("fleet/#", "a//b", "+"):
            for root in (etc, fresh):
                done = fleetctl(*args, "--prefix", bad, "--broker-dir", str(root), "--no-reload", "--out", str(out),
                                check=False)
                assert {f.name: f.read_bytes() for f in etc.iterdir() if f.is_file()} == before, (args, bad)
                assert not out.exists() and not fresh.exists(), (args, bad)
                assert done.returncode == 2 and "prefix" in done.stderr and "Traceback" not in done.stderr, \
                    done.stderr


def test_persister_users_get_one_secret_share_group(tmp_path) -> None:
    """add-user --role persister makes the deployment's share group once (a private file in the broker
    folder) and writes it, with shared_subscription on, into every persister config it emits."""
    etc = tmp_path / "etc"
    made = []
    for name, extra in (("persister-1", []), ("persister-2", []), ("persister-1", ["--rotate"])):
        out = tmp_path / f"{name}{'-rotated' if extra else ''}.yaml"
        fleetctl("add-user", name, "--role", "persister", *extra, "--broker-dir", str(etc), "--no-reload",
                 "--no-tls", "--out", str(out))
        made.append(load_config(str(out)).persister)
    group = (etc / "share-group").read_text().strip()
    assert stat.S_IMODE((etc / "share-group").stat().st_mode) == 0o600 and len(group) >= 16
    assert [(m.client_id, m.shared_subscription, m.share_group) for m in made] == \
        [("persister-1", True, group), ("persister-2", True, group), ("persister-1", True, group)]
    fleetctl("add-user", "ctl-0", "--role", "controller", "--broker-dir", str(etc), "--no-reload", "--no-tls",
             "--out", str(tmp_path / "ctl-0.yaml"))
    assert group not in (tmp_path / "ctl-0.yaml").read_text()


def test_acl_is_generated_per_service_user_for_the_prefix(tmp_path) -> None:
    """The ACL holds the %u agent patterns and one user block per service user for the configured
    prefix; remove-user takes the block out again."""
    etc = tmp_path / "etc"
    for name, role in (("persister-1", "persister"), ("persister-2", "persister"), ("ctl-0", "controller")):
        fleetctl("add-user", name, "--role", role, "--broker-dir", str(etc), "--no-reload", "--prefix", "acme")
    acl = (etc / "acl").read_text()
    assert "pattern read acme/%u/req/#" in acl and "pattern write acme/%u/res/#" in acl
    assert "pattern write acme/%u/status" in acl
    assert "user persister-1\n" in acl and "user persister-2\n" in acl and "user ctl-0\n" in acl
    fleetctl("remove-user", "persister-2", "--broker-dir", str(etc), "--no-reload", "--prefix", "acme")
    assert "persister-2" not in (etc / "acl").read_text() + (etc / "passwd").read_text()
    listed = fleetctl("list-users", "--broker-dir", str(etc)).stdout.split()
    assert listed == ["ctl-0", "controller", "persister-1", "persister"]


def test_example_acl_matches_what_fleetctl_generates() -> None:
    """broker_config/acl, the documented example, holds exactly the rules fleetctl writes for its users."""
    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    example = (ROOT / "broker_config" / "acl").read_text()
    users = {"controller-0": "controller", "operator-1": "operator", "persister-1": "persister",
             "persister-2": "persister"}
    assert rules(example) == rules(render_acl("fleet", users))


def test_credentials_and_tls_come_from_config_and_environment(tmp_path) -> None:
    """FLEET_MQTT_USERNAME/PASSWORD/TLS_* override the config file, so secrets can stay out of it."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"username": "from-file", "tls": {"enabled": False}}}))
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    cfg = load_config(str(path), env={"FLEET_MQTT_PASSWORD": "s3cret:123", "FLEET_MQTT_USERNAME": "host-a",
                                      "FLEET_MQTT_TLS_ENABLED": "true", "FLEET_MQTT_TLS_CA_FILE": str(ca)})
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("host-a", "s3cret:123")
    assert cfg.mqtt.tls == TlsConfig(enabled=True, ca_file=str(ca))


def test_rendered_prod_config_uses_our_ports_and_files(tmp_path) -> None:
    """The test renderer moves both listeners to our ports on 127.0.0.1 and every file into our
    folders, and keeps the security settings of prod.conf."""
    files = BrokerFiles.under(tmp_path / "etc")
    text = render_prod_config(PROD_CONF, files, tmp_path / "data", 18883, 11883, tmp_path / "m.pid")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line for line in lines if line.startswith("listener")] == ["listener 18883 127.0.0.1",
                                                                      "listener 11883 127.0.0.1"]
    for key, path in (("password_file", files.passwd), ("acl_file", files.acl), ("pid_file", tmp_path / "m.pid"),
                      ("certfile", files.certs / "server.crt"), ("persistence_location", tmp_path / "data")):
        assert any(line.startswith(f"{key} {path.resolve()}") for line in lines), key
    for setting in ("allow_anonymous false", "use_username_as_clientid true", "persistence true",
                    "require_certificate false"):
        assert setting in lines
    assert ("user root" in lines) == (os.geteuid() == 0)


# ----------------------------------------------------------------------------- the whole pipeline

def answered_types(db: Path, agent: str, at_least: int) -> set:
    got = rows(db, "select type, count(*) n from requests where agent_id=? and state='ok' group by type", agent)
    return {r["type"] for r in got if r["n"] >= at_least}


def test_whole_pipeline_over_tls_with_acls(secure, procs) -> None:
    """Persister, controller and two agents, each with its own user over TLS with the ACLs on, store
    answers of every built-in type for both agents; the operator's fleetctl request works too."""
    db = secure.tmp / "fleet.db"
    procs.start("persister", "fleet-persister", "--config", str(secure.config("persister-1")))
    procs.start("controller", "fleet-controller", "--config",
                str(secure.config("controller-1", controller={"schedule": {t: 1 for t in BUILTIN_TYPES}})))
    for agent in AGENTS:  # the password from the environment, not the file
        procs.start(agent, "fleet-agent", "--config", str(secure.config(agent, drop_password=True)),
                    env={"FLEET_MQTT_PASSWORD": secure.password(agent)})
    for agent in AGENTS:
        wait_for(lambda a=agent: answered_types(db, a, 2) == set(BUILTIN_TYPES), 60,
                 what=f"two stored answers of every type from {agent} (first round and schedule)")
    agents = {r["agent_id"]: r for r in rows(db, "select * from agents")}
    assert set(agents) == set(AGENTS) and all(agents[a]["online"] for a in AGENTS)
    assert sorted(loads(agents["host-a"]["types"])) == sorted(BUILTIN_TYPES)
    assert rows(db, "select * from rejected") == []

    started = time.monotonic()
    done = fleetctl("--config", str(secure.config("operator-1")), "request", "host-b", "ping", "--timeout", "10")
    assert json.loads(done.stdout)["agent_id"] == "host-b" and time.monotonic() - started < 15
    for name in ("persister", "controller", *AGENTS):
        assert not any(secure.password(u) in procs.log(name) for u in (*SERVICE_USERS, *AGENTS)), name


def test_a_job_over_tls_as_the_operator_reaches_every_agent_and_a_user_who_may_not_read_answers_is_told(
        secure, procs) -> None:
    """`fleetctl request --all` as the operator (TLS, ACLs on) gets both agents' answers; as the
    controller, which may ask but not read answers, it gets none (Mosquitto grants the subscription
    and drops what the user may not read), and fleetctl says what to check."""
    for agent in AGENTS:
        procs.start(agent, "fleet-agent", "--config", str(secure.config(agent)))
    operator = secure.config("operator-1")

    def job() -> subprocess.CompletedProcess | None:
        done = fleetctl("--config", str(operator), "request", "--all", "ping", "--json", check=False)
        return done if done.returncode == 0 else None

    result = json.loads(wait_for(job, 30, interval_s=0.5, what="a job both agents answered").stdout)
    assert (result["targeted"], result["ok"], result["queued"]) == (2, 2, 0)
    assert sorted(r["agent_id"] for r in result["results"]) == sorted(AGENTS)
    done = fleetctl("--config", str(secure.config("controller-1")), "request", "--all", "ping", "--timeout", "1",
                    check=False)
    assert done.returncode == 1 and "no answer 2" in done.stderr, done.stderr
    assert f"check that user 'controller-1' may read {secure.prefix}/+/res/+" in done.stderr
