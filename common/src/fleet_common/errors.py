"""One base exception for the project; subclasses carry what went wrong."""

from __future__ import annotations


class FleetError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FleetError):
    """The configuration is wrong; the message names the key and what to do."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key
        self.problem = problem


class ConfigFileError(ConfigError):
    """The config file itself cannot be used: "file X[, line N]: problem"."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        super().__init__("--config", problem)
        self.path, self.line = path, line
        self.args = (f"file {path}{'' if line is None else f', line {line}'}: {problem}",)

    def __str__(self) -> str:
        return str(self.args[0])


class ContractError(FleetError):
    """A topic or payload breaks the wire contract; `reason` is short and stable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
