"""The project's one version, as each installed part reports it.

Every distribution takes its version from the repository's VERSION file at build time
(pyproject.toml: `dynamic = ["version"]`); the packages read it back from their installed
metadata rather than repeating it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def dist_version(distribution: str) -> str:
    """The installed version of `distribution` ("fleet-agent", ...); "0+unknown" when run from a
    source tree that was never installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0+unknown"


__all__ = ["dist_version"]
