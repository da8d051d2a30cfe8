"""SIGHUP: reread the config file and apply `controller.schedule` and `controller.groups` to the
running controller. A file that does not load is refused with one line naming the key, and the
running schedule stays; other keys that changed take a restart, and the log says which."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from fleet_common.config import Config, load_config
from fleet_common.errors import FleetError

from .controller import Controller

log = logging.getLogger("fleet.controller")

RELOADABLE = frozenset({"controller.schedule", "controller.groups"})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The config keys, as a user writes them ('mqtt.port', 'controller.metrics_port'), whose
    values differ between two configs (or two sections of one)."""
    out: list[str] = []
    for f in dataclasses.fields(old):
        if not f.compare:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        key = f"{prefix}{f.name}"
        if f.metadata.get("flat"):  # persister.metrics_port is metrics.port written flat
            out += changed_keys(a, b, f"{key}_")
        elif dataclasses.is_dataclass(a) and not hasattr(a, "parse"):  # Shard is one value, "0/1"
            out += changed_keys(a, b, f"{key}.")
        else:
            out.append(key)
    return out


def reload(controller: Controller, path: str | None) -> bool:
    """Reread `path` (as at start: None is ./config.yaml) and apply its schedule and groups;
    False, with the running schedule kept, if the file is refused."""
    try:
        cfg: Config = load_config(path)
    except FleetError as exc:
        log.error("reload refused, the running schedule stays: %s", exc)
        return False
    restart = [k for k in changed_keys(controller.cfg, cfg) if k not in RELOADABLE]
    started = time.monotonic()
    change = controller.apply_schedule(cfg.controller)
    log.info("reloaded the schedule in %.0f ms: %s; %d agents changed intervals (%d types turned on, %d turned "
             "off, %d at a new interval); the others keep their phases", 1000 * (time.monotonic() - started),
             controller.schedule.rules.describe(), change.agents, change.started, change.stopped, change.moved)
    if restart:
        log.warning("reload: %s changed in the file; only controller.schedule and controller.groups are "
                    "reloaded, restart fleet-controller to apply the rest", ", ".join(restart))
    return True


__all__ = ["RELOADABLE", "changed_keys", "reload"]
