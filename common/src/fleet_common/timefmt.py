"""Timestamps (RFC 3339 UTC with milliseconds) and time-ordered ids."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

from .errors import ContractError

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


# Every message carries timestamps and the persister formats and parses several per message,
# so both directions keep the whole-second part ("2026-11-26T04:30:00") in a small cache.
_CANONICAL_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
_HEADS: dict[int, str] = {}
_SECONDS: dict[str, int] = {}
_CACHE_MAX = 512


# What RFC 3339 text can hold: years 0001 to 9999 (UTC).
EARLIEST_S = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
LATEST_S = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc).timestamp()


def iso(epoch_s: float) -> str:
    """Format seconds since the epoch as `2026-11-26T04:30:00.123Z` (years 0001 to 9999;
    ValueError outside them)."""
    second, ms = divmod(round(epoch_s * 1000), 1000)
    head = _HEADS.get(second)
    if head is None:
        t = datetime.fromtimestamp(second, tz=timezone.utc)
        # not strftime: its %Y writes year 1 as "1" on glibc
        head = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        if len(_HEADS) >= _CACHE_MAX:
            _HEADS.clear()
        _HEADS[second] = head
    return f"{head}.{ms:03d}Z"


def is_canonical(text: str) -> bool:
    """True if `text` is already what iso() writes (it may still name a date that does not exist)."""
    return len(text) == 24 and _CANONICAL_RE.match(text) is not None


def now_iso() -> str:
    return iso(time.time())


def parse_iso(text: str) -> float:
    """Parse an RFC 3339 timestamp to seconds since the epoch; ContractError("bad_timestamp")
    if it is not one, or lies outside the years 0001 to 9999 in UTC (which no store can hold)."""
    value = _parse_iso(text)
    if not EARLIEST_S <= value <= LATEST_S:
        raise ContractError("bad_timestamp", f"{str(text)[:40]!r} is outside the years 0001 to 9999 (UTC)")
    return value


def _parse_iso(text: str) -> float:
    if isinstance(text, str) and is_canonical(text):
        head = text[:19]
        second = _SECONDS.get(head)
        if second is None:
            try:
                second = int(datetime.fromisoformat(head + "+00:00").timestamp())
            except ValueError as exc:
                raise ContractError("bad_timestamp", str(exc)) from None
            if len(_SECONDS) >= _CACHE_MAX:
                _SECONDS.clear()
            _SECONDS[head] = second
        return second + int(text[20:23]) / 1000
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


def ago(ts: str | None, now_s: float | None = None) -> str:
    """How long before `now_s` (default: now) timestamp `ts` was, for people: "never", "42s ago",
    "5m ago", "3h ago", "2d ago" (a time ahead reads "0s ago")."""
    if not ts:
        return "never"
    seconds = max(0.0, (time.time() if now_s is None else now_s) - parse_iso(ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def new_id() -> str:
    """A 32-hex-digit id that sorts by creation time (48-bit ms clock + 80 random bits)."""
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    return f"{ms:012x}{os.urandom(10).hex()}"


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and bool(_ID_RE.match(value))
