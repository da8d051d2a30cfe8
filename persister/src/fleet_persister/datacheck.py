"""The persister's check of a built-in type's data: fleet_common.datatypes compiled to msgspec.

The shapes are defined once, in fleet_common.datatypes, whose own checker (plain Python, as
the agent needs) takes about 350 µs for a processes answer of 250 rows, and fastjsonschema
about 470; msgspec checks the same in C in about 25 (docs/sizing.md). So the persister asks
msgspec whether the data conforms and, only when it does not, asks the reference checker to
say where and why, in the project's words (`data.partitions[0] is a string, not an object`).
tests/test_datatypes.py holds the two together on generated data.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Literal, Optional

import msgspec

from fleet_common import ContractError
from fleet_common.datatypes import BUILTIN, Arr, Bool, DataType, Num, Obj, Shape, Str, Timestamp

_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"


def msgspec_type(shape: Shape, name: str = "Data") -> Any:
    """The msgspec type that accepts exactly what `shape` accepts."""
    t: Any
    if isinstance(shape, Obj):
        if shape.values is not None:
            t = dict[str, msgspec_type(shape.values, name)]  # type: ignore[misc]
        else:
            required: list[tuple[str, Any]] = []
            optional: list[tuple[str, Any, Any]] = []
            for key, f in shape.fields.items():
                inner = msgspec_type(f.shape, f"{name}_{key}")
                if f.required:
                    required.append((key, inner))
                else:
                    optional.append((key, Optional[inner], None))
            # gc=False: the objects are dropped at once and hold no cycles; a fifth quicker
            t = msgspec.defstruct(name, [*required, *optional], forbid_unknown_fields=False, gc=False)
    elif isinstance(shape, Arr):
        t = list[msgspec_type(shape.items, name)]  # type: ignore[misc]
        if shape.max_items is not None:
            t = _meta(t, max_length=shape.max_items)
    elif isinstance(shape, Num):
        t = _meta(int if shape.integer else float, ge=shape.minimum, le=shape.maximum)
    elif isinstance(shape, Str):
        t = Literal[tuple(shape.enum)] if shape.enum else _meta(str, max_length=shape.max_length)
    elif isinstance(shape, Timestamp):
        t = _meta(str, pattern=_TS_PATTERN)
    elif isinstance(shape, Bool):
        t = bool
    else:
        raise TypeError(f"no msgspec type for {shape!r}")
    return Optional[t] if shape.nullable else t


def _meta(t: Any, **bounds: Any) -> Any:
    given = {k: v for k, v in bounds.items() if v is not None}
    return Annotated[t, msgspec.Meta(**given)] if given else t


Checker = Callable[[dict[str, Any], int], None]


def _checker(datatype: DataType) -> Checker:
    target = msgspec_type(datatype.data, f"{datatype.name}_data")
    convert, invalid, limit = msgspec.convert, msgspec.ValidationError, datatype.max_payload_bytes

    def check(data: dict[str, Any], payload_bytes: int) -> None:
        if payload_bytes > limit:
            datatype.check_data(data, payload_bytes)  # says so
        try:
            convert(data, target)
        except invalid as exc:
            datatype.check_data(data, payload_bytes)  # raises with the field's path
            # msgspec and the reference disagree: refuse anyway, in msgspec's words
            raise ContractError("bad_data", re.sub(r"`\$", "`data", str(exc))) from None

    return check


CHECKERS: dict[str, Checker] = {name: _checker(t) for name, t in BUILTIN.items()}


def check_data(type_: str, data: dict[str, Any], payload_bytes: int) -> None:
    """ContractError("bad_data", ...) if `data` is not what built-in type `type_` answers with;
    nothing to check for types beyond the built-ins."""
    checker = CHECKERS.get(type_)
    if checker is not None:
        checker(data, payload_bytes)


__all__ = ["CHECKERS", "check_data", "msgspec_type"]
