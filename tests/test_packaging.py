"""How the parts are packaged: one version for all, one lock that `make` installs with, and an
agent-only install that brings the agent's three dependencies and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
VERSION = (ROOT / "VERSION").read_text().strip()


def pyprojects() -> dict[str, Path]:
    return {p.parent.name: p for p in sorted(ROOT.glob("*/pyproject.toml"))}


def requirements(path: Path) -> list[Requirement]:
    """The third-party requirements a pyproject.toml or requirements file names."""
    text = path.read_text()
    if path.name == "pyproject.toml":
        import tomllib

        names = tomllib.loads(text)["project"].get("dependencies", [])
    else:
        names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    reqs = [Requirement(n) for n in names if n]
    return [r for r in reqs if not canonicalize_name(r.name).startswith(("fleet-", "fleetctl"))]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def test_every_part_takes_its_version_from_the_one_version_file() -> None:
    """Each pyproject.toml reads VERSION, each part's VERSION links to the repository's, and the
    installed parts and their __version__ say the same."""
    import fleet_sim

    import fleet_agent
    import fleet_common
    import fleet_controller
    import fleet_persister
    import fleet_store

    for folder, path in pyprojects().items():
        import tomllib

        doc = tomllib.loads(path.read_text())
        assert "version" not in doc["project"] and doc["project"]["dynamic"] == ["version"], folder
        assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"file": "VERSION"}, folder
        link = path.parent / "VERSION"
        assert link.is_symlink() and link.resolve() == (ROOT / "VERSION").resolve(), folder
        assert distribution(doc["project"]["name"]).version == VERSION, folder
    for module in (fleet_agent, fleet_common, fleet_controller, fleet_persister, fleet_sim, fleet_store):
        assert module.__version__ == VERSION, module.__name__


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    """constraints.txt pins each third-party package a part or the test tools ask for, at a version
    the open range in its pyproject.toml accepts (run `make lock` after changing one)."""
    pinned = pins()
    for path in [*pyprojects().values(), ROOT / "requirements-dev.txt"]:
        for req in requirements(path):
            name = canonicalize_name(req.name)
            where = f"{path.parent.name}/{path.name}"
            assert name in pinned, f"{where}: {req.name} is not in constraints.txt; run make lock"
            assert req.specifier.contains(pinned[name], prereleases=True), \
                f"{where}: {req} does not admit the locked {pinned[name]}; run make lock"


def test_the_makefile_installs_with_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", makefile)


@pytest.mark.slow
def test_an_agent_only_install_brings_paho_psutil_and_pyyaml_alone(tmp_path: Path) -> None:
    """`pip install ./common ./agent` into a new virtual environment (with the lock) installs the
    agent, the wire contract, paho-mqtt, psutil and PyYAML, and nothing else."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([*pip, "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT / "common"),
                    str(ROOT / "agent")], check=True, env=env, cwd=tmp_path)
    listed = subprocess.run([*pip, "list", "--format=freeze"], check=True, capture_output=True, text=True,
                            env=env).stdout
    installed = {canonicalize_name(line.split("==")[0]) for line in listed.splitlines() if "==" in line}
    installed -= {"pip", "setuptools", "wheel"}
    assert installed == {"fleet-agent", "fleet-common", "paho-mqtt", "psutil", "pyyaml"}, installed
    version = subprocess.run([str(venv / "bin" / "fleet-agent"), "--version"], check=True, capture_output=True,
                             text=True).stdout
    assert VERSION in version
