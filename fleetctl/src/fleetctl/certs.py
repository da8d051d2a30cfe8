"""`fleetctl make-certs`: a private CA and the broker's (and optionally agents') certificates,
made with the `openssl` command so that no new Python dependency is needed.

    <dir>/ca.crt ca.key            the private CA (ca.key never leaves this machine)
    <dir>/server.crt server.key    the broker's certificate, SAN: localhost, 127.0.0.1, --host ...
    <dir>/agents/<id>.crt <id>.key client certificates (only with --agent; for require_certificate)

An existing CA is reused, so the command can be run again to add certificates; an existing
certificate is kept unless --force is given. Keys are written with mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet_common.errors import FleetError
from fleet_common.topics import check_agent_id

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CURVE = "prime256v1"  # EC keys: small and fast on constrained agents; Mosquitto and OpenSSL 1.1+ accept them
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity that mainstream TLS clients accept for a leaf certificate


class CertError(FleetError):
    pass


@dataclass
class MadeCerts:
    directory: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


def _openssl() -> str:
    found = shutil.which("openssl")
    if not found:
        raise CertError("the 'openssl' command is not installed; install it (Debian/Ubuntu: "
                        "'sudo apt-get install openssl') and run make-certs again")
    return found


def _run(*args: str) -> None:
    done = subprocess.run([_openssl(), *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CertError(f"openssl {args[0]} failed: {last}")


def _san(hosts: Sequence[str]) -> str:
    entries = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            ipaddress.ip_address(host)
            entries.append(f"IP:{host}")
        except ValueError:
            if not host or any(c.isspace() or c in ",/" for c in host):
                raise CertError(f"--host {host!r} is not a host name or IP address") from None
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def _new_key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{CURVE}", "-out", str(path))
    path.chmod(0o600)


def _make_ca(made: MadeCerts, name: str) -> None:
    key = made.directory / "ca.key"
    _new_key(key)
    _run("req", "-x509", "-new", "-key", str(key), "-out", str(made.ca_file), "-days", str(CA_DAYS),
         "-subj", f"/CN={name}", "-sha256",
         "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash")
    made.created += [made.ca_file, key]


def _make_leaf(made: MadeCerts, cert: Path, key: Path, common_name: str, extensions: str) -> None:
    _new_key(key)
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "leaf.csr", Path(tmp) / "leaf.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extensions)
        _run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
        _run("x509", "-req", "-in", str(csr), "-CA", str(made.ca_file), "-CAkey", str(made.directory / "ca.key"),
             "-CAcreateserial", "-out", str(cert), "-days", str(LEAF_DAYS), "-sha256", "-extfile", str(ext))
    made.created += [cert, key]


def make_certs(directory: Path, hosts: Sequence[str] = (), agents: Sequence[str] = (), *,
               force: bool = False, ca_name: str = "fleet telemetry private CA") -> MadeCerts:
    """Create (or reuse) the CA in `directory`, then the server certificate for localhost,
    127.0.0.1 and `hosts`, and a client certificate per agent id in `agents`."""
    all_hosts = [*hosts, *DEFAULT_HOSTS]
    san = _san(all_hosts)
    for agent in agents:
        check_agent_id(agent)
    made = MadeCerts(Path(directory))
    made.directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # no window in which a fresh key is readable by others
    try:
        if made.ca_file.exists() and (made.directory / "ca.key").exists():
            made.kept.append(made.ca_file)
        elif made.ca_file.exists() or (made.directory / "ca.key").exists():
            raise CertError(f"{made.directory} holds only half of a CA (ca.crt or ca.key is missing); "
                            "restore the missing file or remove the other one")
        else:
            _make_ca(made, ca_name)
        if force or not made.server_cert.exists():
            _make_leaf(made, made.server_cert, made.server_key, hosts[0] if hosts else "localhost",
                       f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
        else:
            made.kept.append(made.server_cert)
        for agent in agents:
            cert = made.directory / "agents" / f"{agent}.crt"
            if force or not cert.exists():
                cert.parent.mkdir(exist_ok=True)
                _make_leaf(made, cert, cert.with_suffix(".key"), agent, "extendedKeyUsage=clientAuth\n")
            else:
                made.kept.append(cert)
    finally:
        os.umask(old_umask)
    for public in [made.ca_file, made.server_cert, *made.directory.glob("agents/*.crt")]:
        if public.exists():
            public.chmod(0o644)  # certificates are public; clients and the broker must read them
    return made
