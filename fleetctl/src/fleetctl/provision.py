"""Credentials and ACLs for the production broker (broker_config/prod.conf).

The broker directory (fleetctl --broker-dir, default /etc/mosquitto/fleet) holds:

    passwd       one `name:$7$...` line per user (the mosquitto_passwd format)
    roles.yaml   service users and their role: {persister-1: persister, ...}
    acl          generated from roles.yaml and the topic prefix; never edit by hand
    share-group  the persisters' secret share group, made with the first persister user
    certs/       fleetctl make-certs

Every user name is also its MQTT client id (use_username_as_clientid), so user names
follow the agent id rules and service users are named per instance. A user in
passwd but not in roles.yaml is an agent: the ACL's %u patterns give it its own
topics and nothing else. Passwords are generated here, hashed here (no password on
any command line), shown once, and never logged.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import os
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleet_common.brokerwatch import TOPICS as BROKER_TOPICS
from fleet_common.config import SHARE_GROUP_RE, Config
from fleet_common.errors import FleetError
from fleet_common.topics import REQ, RES, STATUS, Topics, check_agent_id

from .broker import render_config
from .certs import make_certs

DEFAULT_BROKER_DIR = "/etc/mosquitto/fleet"
DEFAULT_PID_FILE = "/run/mosquitto/mosquitto.pid"
DEFAULT_TLS_PORT = 8883

# What each service role may do, as (access, topic filter under the prefix).
# The broker's own figures on messages it dropped (fleet_common.brokerwatch): topics of their own,
# not under the prefix.
SYS_READ = tuple(("read", topic) for topic in BROKER_TOPICS)
ROLE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # schedules requests; learns the fleet from the retained statuses
    "controller": (("write", f"+/{REQ}/#"), ("read", f"+/{STATUS}"), *SYS_READ),
    # stores everything; reads plainly or through $share/<secret group>/..., which these rules cover
    "persister": (("read", f"+/{REQ}/#"), ("read", f"+/{RES}/#"), ("read", f"+/{STATUS}"), *SYS_READ),
    # fleetctl request and mosquitto_rr by hand: ask, read the answers, see who is online
    "operator": (("write", f"+/{REQ}/#"), ("read", f"+/{RES}/#"), ("read", f"+/{STATUS}")),
}
ROLES = tuple(ROLE_RULES)
# Every user may act as the agent whose id is its user name, and only as that agent.
AGENT_PATTERNS = (("read", f"%u/{REQ}/#"), ("write", f"%u/{RES}/#"), ("write", f"%u/{STATUS}"))
# ...except service users. Mosquitto 2.0 checks a user's own block before the patterns and puts
# its `deny` lines first, so this one line per service user takes its name's topics away from
# the patterns: without it operator alice could publish a retained fleet/alice/status and
# answers on fleet/alice/res/#, a phantom agent the persister would store. Per-agent blocks
# instead would make Mosquitto search every user per ACL line and per connect.
SERVICE_DENY = "{name}/#"

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; Mosquitto reads the count from each line
SALT_BYTES = 12


class ProvisionError(FleetError):
    pass


@dataclass(frozen=True)
class BrokerFiles:
    """Where the broker's security files live."""

    root: Path
    passwd: Path
    acl: Path

    @classmethod
    def under(cls, root: str | Path, passwd: str | Path | None = None,
              acl: str | Path | None = None) -> BrokerFiles:
        base = Path(root)
        return cls(base, Path(passwd) if passwd else base / "passwd", Path(acl) if acl else base / "acl")

    @property
    def roles(self) -> Path:
        return self.root / "roles.yaml"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def share_group(self) -> Path:
        return self.root / "share-group"


# ----------------------------------------------------------------------------- passwords

def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The `$7$` PBKDF2-SHA512 hash that mosquitto_passwd 2.0 writes and Mosquitto 2.0 checks."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    return secrets.compare_digest(hash_password(password, salt, int(parts[2])), hashed)


def new_password() -> str:
    return secrets.token_urlsafe(24)  # 192 bits; URL-safe, so it survives YAML and shell quoting


def read_passwd(path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    if not path.exists():
        return users
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, hashed = line.partition(":")
            users[name] = hashed
    return users


def _write_private(path: Path, text: str, new_mode: int = 0o640) -> None:
    """Replace `path` atomically, keeping an existing file's mode and owner (the broker's
    group must keep read access); a new file gets `new_mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, old.st_mode & 0o777 if old else new_mode)
        if old is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file stays ours, as the old one was
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_passwd(path: Path, users: Mapping[str, str]) -> None:
    _write_private(path, "".join(f"{name}:{hashed}\n" for name, hashed in users.items()))


# ----------------------------------------------------------------------------- roles and ACL

def read_roles(files: BrokerFiles) -> dict[str, str]:
    if not files.roles.exists():
        return {}
    loaded = yaml.safe_load(files.roles.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict) or any(r not in ROLES for r in loaded.values()):
        raise ProvisionError(f"{files.roles} must map user names to one of {', '.join(ROLES)}; fix or remove it")
    return {str(k): str(v) for k, v in loaded.items()}


def render_acl(prefix: str, roles: Mapping[str, str]) -> str:
    """The Mosquitto ACL for topic prefix `prefix` and the service users in `roles`."""
    Topics(prefix)  # validates the prefix
    lines = [
        "# Generated by fleetctl from roles.yaml for topic prefix " + repr(prefix) + "; do not edit:",
        "# fleetctl add-user / remove-user / rewrite-acl rewrite it. Anything not granted here is denied.",
        "",
        "# Agents: every user may act as the agent whose id is its user name (= its client id,",
        "# use_username_as_clientid): read its own requests, write its own responses and status.",
        *(f"pattern {access} {prefix}/{topic}" for access, topic in AGENT_PATTERNS),
    ]
    if roles:
        lines += ["", "# Service users: what their role needs. A service user is never an agent: Mosquitto checks",
                  "# its `topic deny` line before anything else, so the patterns above give it nothing."]
    for name, role in sorted(roles.items()):
        lines += ["", f"# role: {role}", f"user {name}", f"topic deny {prefix}/{SERVICE_DENY.format(name=name)}"]
        lines += [f"topic {access} {topic if topic.startswith('$') else f'{prefix}/{topic}'}"
                  for access, topic in ROLE_RULES[role]]
    return "\n".join(lines) + "\n"


def write_acl(files: BrokerFiles, prefix: str) -> None:
    _write_private(files.acl, render_acl(prefix, read_roles(files)))


def acl_is_current(files: BrokerFiles, prefix: str) -> bool:
    """Whether the ACL on disk is what this version generates now (else an older one wrote it)."""
    try:
        return files.acl.read_text(encoding="utf-8") == render_acl(prefix, read_roles(files))
    except FileNotFoundError:
        return False


def rewrite_acl(files: BrokerFiles, prefix: str) -> None:
    """Regenerate the ACL from roles.yaml, e.g. after an upgrade changed what the roles may do."""
    _check_prefix(prefix)
    with _locked(files):
        write_acl(files, prefix)


@contextmanager
def _locked(files: BrokerFiles) -> Iterator[None]:
    """One provisioning change at a time, so two concurrent add-agent runs cannot lose an entry."""
    files.root.mkdir(parents=True, exist_ok=True)
    with open(files.root / ".fleetctl.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_prefix(prefix: str) -> str:
    """Checked before anything is written: a password line whose ACL cannot be written would be
    a password nobody was ever shown."""
    try:
        Topics(prefix)
    except FleetError:
        raise ProvisionError(f"--prefix {prefix!r} is not a topic prefix: one or more topic levels of "
                             "[A-Za-z0-9_.-] separated by '/'") from None
    return prefix


def _check_name(name: str) -> str:
    try:
        return check_agent_id(name)
    except FleetError:
        raise ProvisionError(f"{name!r} is not a valid name: user names are also client ids and agent ids, "
                             "1-64 characters of [A-Za-z0-9_.-] not starting with '.'") from None


def add_agent(files: BrokerFiles, agent_id: str, prefix: str, rotate: bool = False) -> str:
    """Add (or with `rotate`, re-key) an agent; returns its new password."""
    _check_name(agent_id)
    _check_prefix(prefix)
    with _locked(files):
        users, roles = read_passwd(files.passwd), read_roles(files)
        if agent_id in roles:
            raise ProvisionError(f"{agent_id!r} is a {roles[agent_id]} user; an agent needs a name of its own")
        if agent_id in users and not rotate:
            raise ProvisionError(f"agent {agent_id!r} already exists; pass --rotate to give it a new password, "
                                 "or remove-agent it first")
        password = new_password()
        users[agent_id] = hash_password(password)
        write_passwd(files.passwd, users)
        write_acl(files, prefix)
    return password


def remove_agent(files: BrokerFiles, agent_id: str, prefix: str) -> None:
    _check_prefix(prefix)
    with _locked(files):
        users, roles = read_passwd(files.passwd), read_roles(files)
        if agent_id in roles:
            raise ProvisionError(f"{agent_id!r} is a {roles[agent_id]} user, not an agent; use remove-user")
        if agent_id not in users:
            raise ProvisionError(f"no agent {agent_id!r} in {files.passwd}; 'fleetctl list-users' shows who exists")
        del users[agent_id]
        write_passwd(files.passwd, users)
        write_acl(files, prefix)


def add_user(files: BrokerFiles, name: str, role: str, prefix: str, rotate: bool = False) -> str:
    """Add (or with `rotate`, re-key) a service user with `role`; returns its new password."""
    _check_name(name)
    _check_prefix(prefix)
    if role not in ROLES:
        raise ProvisionError(f"role {role!r} is not one of {', '.join(ROLES)}")
    with _locked(files):
        users, roles = read_passwd(files.passwd), read_roles(files)
        if name in users and name not in roles:
            raise ProvisionError(f"{name!r} is an agent; a service user needs a name of its own")
        if name in users and not rotate:
            raise ProvisionError(f"user {name!r} already exists; pass --rotate to give it a new password, "
                                 "or remove-user it first")
        if role == "persister":
            ensure_share_group(files)  # under the lock: two first persisters get one group
        password = new_password()
        users[name] = hash_password(password)
        roles[name] = role
        _write_private(files.roles, yaml.safe_dump(roles, sort_keys=True))
        write_passwd(files.passwd, users)
        write_acl(files, prefix)
    return password


def ensure_share_group(files: BrokerFiles) -> str:
    """The deployment's share group for persisters: made once (mode 0600), then reused, so every
    persister user's config names the same one. A secret, because any client that knows it can
    join the group and have the broker drop the messages it hands that client."""
    path = files.share_group
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(18) + "\n", new_mode=0o600)  # 24 characters, 144 bits
    group = path.read_text(encoding="utf-8").strip()
    if not SHARE_GROUP_RE.match(group):
        raise ProvisionError(f"{path} does not hold a share group (16 or more characters of [A-Za-z0-9_-]); "
                             "remove it and re-provision every persister user with --rotate to make a new one")
    return group


def remove_user(files: BrokerFiles, name: str, prefix: str) -> None:
    _check_prefix(prefix)
    with _locked(files):
        users, roles = read_passwd(files.passwd), read_roles(files)
        if name not in roles:
            raise ProvisionError(f"no service user {name!r} in {files.roles}"
                                 + ("; it is an agent: use remove-agent" if name in users else ""))
        del roles[name]
        users.pop(name, None)
        _write_private(files.roles, yaml.safe_dump(roles, sort_keys=True))
        write_passwd(files.passwd, users)
        write_acl(files, prefix)


def list_users(files: BrokerFiles) -> list[tuple[str, str]]:
    """(name, role) for every user; agents have the role 'agent'."""
    roles = read_roles(files)
    return [(name, roles.get(name, "agent")) for name in sorted(read_passwd(files.passwd))]


# ----------------------------------------------------------------------------- client configs

@dataclass(frozen=True)
class BrokerAddress:
    """How a client reaches the broker: what goes into its config's mqtt section."""

    host: str
    port: int
    prefix: str
    ca_file: str | None  # None: plain MQTT (the localhost listener)


def client_config(name: str, role: str, password: str, broker: BrokerAddress,
                  share_group: str | None = None) -> dict[str, Any]:
    """The config file of a new user: its mqtt section and, per role, its own id (and for a
    persister the deployment's share group, so more persisters split the load)."""
    mqtt: dict[str, Any] = {"host": broker.host, "port": broker.port, "topic_prefix": broker.prefix,
                            "username": name, "password": password}
    if broker.ca_file is not None:
        mqtt["tls"] = {"enabled": True, "ca_file": broker.ca_file}
    data: dict[str, Any] = {"mqtt": mqtt}
    if role == "agent":
        data["agent"] = {"id": name}
    elif role in ("controller", "persister"):
        data[role] = {"client_id": name}  # the broker forces it anyway; this keeps the logs honest
    if role == "persister" and share_group is not None:
        data[role].update(shared_subscription=True, share_group=share_group)
    return data


def emit_config(data: dict[str, Any], out: Path | None) -> str:
    """Write the config to `out` (a new file, mode 0600) or return it as text to print."""
    name = data["mqtt"]["username"]
    text = (f"# fleet config for {name!r}. It holds the password, which is shown only once:\n"
            "# keep this file private (mode 0600) or move the password to FLEET_MQTT_PASSWORD.\n"
            + yaml.safe_dump(data, sort_keys=False))
    if out is None:
        return text
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ProvisionError(f"{out} already exists; choose another --out path or remove it") from None
    except OSError as exc:
        raise ProvisionError(f"cannot create {out}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return ""


# ----------------------------------------------------------------------------- broker reload

def _is_mosquitto(pid: int) -> bool:
    comm = Path(f"/proc/{pid}/comm")
    if not Path("/proc/self").exists():
        return True  # no procfs (macOS): trust the pid file
    try:
        return "mosquitto" in comm.read_text()
    except OSError:
        return False


def reload_broker(pid: int | None, pid_file: Path) -> str:
    """Send SIGHUP so Mosquitto rereads its password and ACL files; return what happened."""
    source = "--broker-pid"
    if pid is None:
        try:
            text = pid_file.read_text().strip()
        except FileNotFoundError:
            return (f"no broker pid file at {pid_file}, so no broker was reloaded; the change applies when "
                    "Mosquitto starts (or pass --pid-file / --broker-pid of the running broker)")
        if not re.fullmatch(r"\d+", text):
            raise ProvisionError(f"{pid_file} does not hold a process id; pass --broker-pid")
        pid, source = int(text), str(pid_file)
    if not _is_mosquitto(pid):
        raise ProvisionError(f"process {pid} (from {source}) is not a running Mosquitto; the files are written, "
                             "reload the broker yourself (systemctl reload mosquitto, or kill -HUP its pid)")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ProvisionError(f"no process {pid} (from {source}); the files are written: start or reload the "
                             "broker yourself") from None
    except PermissionError:
        raise ProvisionError(f"not allowed to signal the broker (pid {pid}); the files are written: run as root "
                             "or reload it yourself (systemctl reload mosquitto)") from None
    return f"reloaded the broker (SIGHUP to pid {pid})"


# ----------------------------------------------------------------------------- test/embedded config

def render_prod_config(template: Path, files: BrokerFiles, data_dir: Path, tls_port: int,
                       plain_port: int | None, pid_file: Path) -> str:
    """prod.conf for a broker of our own (the tests): our two ports on 127.0.0.1, our files,
    and, as root, `user root` (see broker.render_config) so Mosquitto can read a private folder."""
    text = render_config(template, tls_port, data_dir)  # first listener, persistence, user root
    plain = re.compile(r"(?m)^listener\s+\d+\s+127\.0\.0\.1\s*$")
    listeners = plain.findall(text)
    if len(listeners) != 2:
        raise ProvisionError(f"{template} must have a TLS listener and a localhost listener")
    tls_line = listeners[0]
    head, _, tail = text.partition(tls_line)
    tail = plain.sub("" if plain_port is None else f"listener {plain_port} 127.0.0.1", tail, count=1)
    text = head + tls_line + tail
    paths = {"certfile": files.certs / "server.crt", "keyfile": files.certs / "server.key",
             "cafile": files.certs / "ca.crt", "password_file": files.passwd, "acl_file": files.acl,
             "pid_file": pid_file}
    for key, path in paths.items():
        text = re.sub(rf"(?m)^{key}\s+.*$", f"{key} {Path(path).resolve()}", text)
    return text


# ----------------------------------------------------------------------------- command line

PROVISION_COMMANDS = ("make-certs", "add-agent", "remove-agent", "add-user", "remove-user", "list-users",
                      "rewrite-acl")


def add_provision_parsers(sub: Any) -> None:
    """The provisioning subcommands of fleetctl."""
    files = argparse.ArgumentParser(add_help=False)
    g = files.add_argument_group("broker files")
    g.add_argument("--broker-dir", metavar="DIR", default=os.environ.get("FLEET_BROKER_DIR", DEFAULT_BROKER_DIR),
                   help="where passwd, acl, roles.yaml and certs/ live (default $FLEET_BROKER_DIR or "
                        f"{DEFAULT_BROKER_DIR})")
    g.add_argument("--passwd-file", metavar="PATH", help="password file (default BROKER_DIR/passwd)")
    g.add_argument("--acl-file", metavar="PATH", help="ACL file (default BROKER_DIR/acl)")
    g.add_argument("--prefix", metavar="PREFIX", help="topic prefix of the ACL (default mqtt.topic_prefix)")
    reload = argparse.ArgumentParser(add_help=False)
    g = reload.add_argument_group("broker reload (SIGHUP after a change)")
    g.add_argument("--pid-file", metavar="PATH", default=DEFAULT_PID_FILE,
                   help=f"the running broker's pid file (default {DEFAULT_PID_FILE}, as in prod.conf)")
    g.add_argument("--broker-pid", type=int, metavar="PID", help="signal this pid instead of reading --pid-file")
    g.add_argument("--no-reload", action="store_true", help="only write the files")
    client = argparse.ArgumentParser(add_help=False)
    g = client.add_argument_group("the new user's config")
    g.add_argument("--broker-host", metavar="HOST", help="broker address the client uses (default mqtt.host)")
    g.add_argument("--broker-port", type=int, metavar="PORT",
                   help=f"broker port (default {DEFAULT_TLS_PORT}, or mqtt.port with --no-tls)")
    g.add_argument("--ca-file", metavar="PATH",
                   help="the CA certificate's path on the client's host (default BROKER_DIR/certs/ca.crt)")
    g.add_argument("--no-tls", action="store_true", help="plain MQTT, for the broker's localhost listener")
    g.add_argument("--out", metavar="PATH", help="write the config (with the password) to this new file, "
                                                 "mode 0600, instead of printing it")
    g.add_argument("--rotate", action="store_true", help="the user exists: give it a new password")

    s = sub.add_parser("make-certs", help="create a private CA and the broker's certificate with openssl")
    s.add_argument("dir", metavar="DIR", help="output folder, e.g. /etc/mosquitto/fleet/certs")
    s.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or IP address agents use to reach the broker (repeatable; localhost and "
                        "127.0.0.1 are always included)")
    s.add_argument("--agent", action="append", default=[], metavar="ID",
                   help="also make a client certificate for this agent (repeatable; for require_certificate)")
    s.add_argument("--force", action="store_true", help="replace existing certificates (the CA is kept)")

    s = sub.add_parser("add-agent", parents=[files, reload, client],
                       help="provision an agent: password entry, its config, broker reload")
    s.add_argument("agent", metavar="AGENT_ID")
    s = sub.add_parser("remove-agent", parents=[files, reload], help="revoke an agent and reload the broker")
    s.add_argument("agent", metavar="AGENT_ID")
    s = sub.add_parser("add-user", parents=[files, reload, client],
                       help="provision a service user (controller, persister or operator)")
    s.add_argument("name", metavar="NAME", help="one per instance, e.g. persister-1 (it is the client id)")
    s.add_argument("--role", required=True, choices=ROLES)
    s = sub.add_parser("remove-user", parents=[files, reload], help="revoke a service user and reload the broker")
    s.add_argument("name", metavar="NAME")
    sub.add_parser("list-users", parents=[files], help="users of the broker and their roles")
    sub.add_parser("rewrite-acl", parents=[files, reload],
                   help="regenerate the ACL from roles.yaml (after an upgrade) and reload the broker")


def _files(args: argparse.Namespace) -> BrokerFiles:
    return BrokerFiles.under(args.broker_dir, args.passwd_file, args.acl_file)


def _reload(args: argparse.Namespace) -> None:
    if not args.no_reload:
        print(reload_broker(args.broker_pid, Path(args.pid_file)), file=sys.stderr)


def _address(args: argparse.Namespace, cfg: Config, prefix: str) -> BrokerAddress:
    if args.no_tls:
        return BrokerAddress(args.broker_host or cfg.mqtt.host, args.broker_port or cfg.mqtt.port, prefix, None)
    ca_file = args.ca_file or str((_files(args).certs / "ca.crt").resolve())
    return BrokerAddress(args.broker_host or cfg.mqtt.host, args.broker_port or DEFAULT_TLS_PORT, prefix, ca_file)


def run_provision(args: argparse.Namespace, cfg: Config) -> int | None:
    """Run a provisioning command; None if `args.command` is not one."""
    if args.command not in PROVISION_COMMANDS:
        return None
    if args.command == "make-certs":
        made = make_certs(Path(args.dir), args.host, args.agent, force=args.force)
        for path in made.created:
            print(f"created {path}")
        for path in made.kept:
            print(f"kept    {path} (exists; --force replaces it)")
        return 0
    files = _files(args)
    prefix = _check_prefix(args.prefix or cfg.mqtt.topic_prefix)
    if args.command == "list-users":
        rows = list_users(files)
        print("\n".join(f"{name:<32} {role}" for name, role in rows) or f"no users in {files.passwd}")
        if rows and not acl_is_current(files, prefix):
            print(f"note: {files.acl} is not the ACL this fleetctl generates for prefix {prefix!r} (missing, "
                  "edited, or written by an older version): run 'fleetctl rewrite-acl' to regenerate it "
                  "and reload the broker", file=sys.stderr)
        return 0
    if args.command == "rewrite-acl":
        rewrite_acl(files, prefix)
        print(f"rewrote {files.acl} from {files.roles} for prefix {prefix!r}", file=sys.stderr)
        _reload(args)
        return 0
    if args.command in ("add-agent", "add-user"):
        name, role = (args.agent, "agent") if args.command == "add-agent" else (args.name, args.role)
        address = _address(args, cfg, prefix)  # before any change: a bad option must not half-provision
        out = Path(args.out) if args.out else None
        if out is not None and out.exists():
            raise ProvisionError(f"{out} already exists; choose another --out path or remove it")
        if out is not None and not out.parent.is_dir():
            raise ProvisionError(f"{out.parent} is not a folder; create it or choose another --out path")
        if role == "agent":
            password = add_agent(files, name, prefix, rotate=args.rotate)
        else:
            password = add_user(files, name, role, prefix, rotate=args.rotate)
        group = ensure_share_group(files) if role == "persister" else None
        text = emit_config(client_config(name, role, password, address, group), out)
        if text:
            print(text, end="")
        verb = "re-keyed" if args.rotate else "added"
        print(f"{verb} {role} {name!r} in {files.passwd}" + (f"; config written to {out}" if out else ""),
              file=sys.stderr)
        _reload(args)
        return 0
    if args.command == "remove-agent":
        remove_agent(files, args.agent, prefix)
        print(f"removed agent {args.agent!r} from {files.passwd}", file=sys.stderr)
    else:
        remove_user(files, args.name, prefix)
        print(f"removed user {args.name!r} from {files.passwd} and the ACL", file=sys.stderr)
    _reload(args)
    return 0
