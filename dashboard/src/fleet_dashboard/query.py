"""The query parameters of the dashboard's pages and API, checked. A value a page cannot use is
refused (HTTP 400, naming the parameter and what it may be), never replaced by a default in
silence: `?range=bogus` would otherwise chart the last hour and look like an answer."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from fleet_common.errors import FleetError
from fleet_common.labels import Labels, select

PARTIAL = ("0", "1")


class BadQuery(FleetError):
    """A query parameter the page does not take, or a value it cannot use; `allowed` lists the
    names or values it would take, when there is such a list."""

    def __init__(self, name: str, problem: str, allowed: Sequence[str] | None = None) -> None:
        super().__init__(f"query parameter '{name}': {problem}")
        self.name = name
        self.problem = problem
        self.allowed = list(allowed) if allowed is not None else None

    def to_dict(self) -> dict[str, object]:
        return {"error": str(self), "parameter": self.name, "allowed": self.allowed}


def check_names(args: Mapping[str, str], takes: Collection[str]) -> None:
    """A misspelt parameter (`?rnage=6h`) is a silent default too: refuse it, saying what the page takes."""
    for name in args:
        if name not in takes:
            what = f"this page takes {', '.join(sorted(takes))}" if takes else "this page takes none"
            raise BadQuery(name, f"is not a parameter of this page; {what}", sorted(takes))


def choice(args: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    value = args.get(name)
    if value is None:
        return default
    if value not in choices:
        shown = ", ".join(repr(c) if c == "" else c for c in choices)
        raise BadQuery(name, f"{value!r} is not one of {shown}", choices)
    return value


def integer(args: Mapping[str, str], name: str, default: int, lowest: int, highest: int | None = None) -> int:
    value = args.get(name)
    if value is None:
        return default
    span = f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest}"
    try:
        number = int(value)
    except ValueError:
        raise BadQuery(name, f"{value!r} is not a whole number; it must be one {span}") from None
    if number < lowest or (highest is not None and number > highest):
        raise BadQuery(name, f"{number} is out of range; it must be a whole number {span}")
    return number


def text(args: Mapping[str, str], name: str, max_chars: int) -> str:
    value = args.get(name, "")
    if len(value) > max_chars:
        raise BadQuery(name, f"is {len(value)} characters long; at most {max_chars} are allowed")
    return value


def local_path(args: Mapping[str, str], name: str) -> str | None:
    """A path on this site to go on to, or None: never another site (`//host`, or `/\\host`, which
    browsers read as `//host`), so a link cannot send a signed-in operator elsewhere."""
    value = args.get(name)
    if value is None or value == "":
        return None
    if not value.startswith("/") or value.startswith("//") or "\\" in value or not value.isprintable():
        raise BadQuery(name, f"{value!r} is not a path on this site; it must start with a single '/'")
    return value


def label_selector(args: Mapping[str, str], name: str) -> Labels:
    """Repeated `?label=key=value` as one selector (every pair must match). A pair that is not a valid
    label, or a key given twice (which no agent could match), is refused rather than dropped."""
    getlist = getattr(args, "getlist", None)
    values: list[str] = getlist(name) if getlist else [args[name]] if name in args else []
    try:
        selector = select(values)
    except ValueError as exc:
        raise BadQuery(name, str(exc)) from None
    if len(selector) < len(values):
        raise BadQuery(name, "gives one key twice; give each key once")
    return selector
