"""Timestamps (RFC 3339 UTC with milliseconds) and time-ordered ids."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

from .errors import ContractError

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


def iso(epoch_s: float) -> str:
    """Format seconds since the epoch as `2026-11-26T04:30:00.123Z`."""
    ms = round(epoch_s * 1000)
    dt = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def now_iso() -> str:
    return iso(time.time())


def parse_iso(text: str) -> float:
    """Parse an RFC 3339 timestamp to seconds since the epoch."""
    if not isinstance(text, str) or not _TS_RE.match(text):
        raise ContractError("bad_timestamp", f"not an RFC 3339 timestamp: {str(text)[:40]!r}")
    head, _, rest = text.partition(".")
    if rest:
        digits = re.match(r"\d+", rest)
        frac = digits.group(0) if digits else ""
        zone = rest[len(frac):]
        text = f"{head}.{(frac + '000000')[:6]}{zone}"
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ContractError("bad_timestamp", str(exc)) from None


def new_id() -> str:
    """A 32-hex-digit id that sorts by creation time (48-bit ms clock + 80 random bits)."""
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    return f"{ms:012x}{os.urandom(10).hex()}"


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and bool(_ID_RE.match(value))
