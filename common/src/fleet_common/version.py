"""The project's one version, as each installed part reports it.

Every distribution takes its version from the repository's VERSION file at build time
(pyproject.toml: `dynamic = ["version"]`); the packages read it back from their installed
metadata rather than repeating it.
"""

from __future__ import annotations

import os
import re
import sys


def dist_version(distribution: str) -> str:
    """The installed version of `distribution` ("fleet-agent", ...); "0+unknown" when run from a
    source tree that was never installed.

    Read from the name of its `<name>-<version>.dist-info` folder on sys.path, which is where
    importlib.metadata finds it too; importlib.metadata itself (with zipfile, csv, pathlib and
    configparser) would add about 0.9 MB to the agent, whose footprint is kept under 30 MB."""
    wanted = re.sub(r"[-_.]+", "_", distribution).lower()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                dist, _, version = name[: -len(".dist-info")].partition("-")
                if re.sub(r"[-_.]+", "_", dist).lower() == wanted and version:
                    return version
    return "0+unknown"


__all__ = ["dist_version"]
