"""Agent labels: a short map of keys to values (`{role: web, dc: ams}`) that an agent advertises
in its birth and that controller groups and jobs select agents by (design.md, "Labels")."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import ContractError

LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_LABELS = 16

Labels = dict[str, str]


def check_labels(value: object) -> Labels:
    """`value` as labels, or ContractError("bad_labels", ...) naming the first wrong pair."""
    if not isinstance(value, Mapping):
        raise ContractError("bad_labels", "labels must be a mapping of key: value")
    if len(value) > MAX_LABELS:
        raise ContractError("bad_labels", f"{len(value)} labels; at most {MAX_LABELS} are allowed")
    out: Labels = {}
    for key, val in value.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise ContractError("bad_labels", f"label key {str(key)[:40]!r} must match [a-z][a-z0-9_]{{0,31}}")
        if not isinstance(val, str) or not LABEL_VALUE_RE.match(val):
            raise ContractError("bad_labels", f"label {key}: value {str(val)[:80]!r} must be 1-64 characters "
                                              "of [A-Za-z0-9_.-]")
        out[key] = val
    return out


def parse_pairs(text: str) -> Labels:
    """"role=web,dc=ams" -> {"role": "web", "dc": "ams"} (the environment's and the command line's
    form). Empty text is no labels. ValueError names the piece that is not key=value."""
    out: Labels = {}
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        key, sep, val = piece.partition("=")
        if not sep:
            raise ValueError(f"{piece[:40]!r} is not key=value")
        out[key.strip()] = val.strip()
    return out


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    """Whether `labels` include every pair of `selector` (an empty selector matches everyone)."""
    have = labels or {}
    return all(have.get(k) == v for k, v in selector.items())


def format_labels(labels: Mapping[str, str] | None) -> str:
    """{"dc": "ams", "role": "web"} -> "dc=ams,role=web" (sorted; empty text for none)."""
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def select(pairs: Iterable[str]) -> Labels:
    """Command-line `--label k=v` values as one selector; ValueError when one is not a valid pair."""
    selector: Labels = {}
    for text in pairs:
        pair = parse_pairs(text)
        if len(pair) != 1:
            raise ValueError(f"{text!r} must be one key=value pair")
        selector.update(pair)
    try:
        return check_labels(selector)
    except ContractError as exc:
        raise ValueError(exc.detail) from None
