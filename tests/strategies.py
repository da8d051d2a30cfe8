"""Hypothesis strategies shared by the property tests: JSON of any shape, and data that a
built-in type's shape (fleet_common.datatypes) accepts."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fleet_common import iso
from fleet_common.datatypes import Arr, Bool, Num, Obj, Shape, Str, Timestamp

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.text(st.characters(categories=("L",)), max_size=6)
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


ANY_JSON = st.recursive(JSON_SCALARS, _containers, max_leaves=8)


def conforming(shape: Shape) -> st.SearchStrategy[Any]:
    """Values `shape` accepts: every required field, some optional ones, extra keys, nulls where allowed."""
    base: st.SearchStrategy[Any]
    if isinstance(shape, Obj):
        if shape.values is not None:
            base = st.dictionaries(st.sampled_from(["user", "system", "idle", "read_count"]),
                                   conforming(shape.values), max_size=4)
        else:
            required = {k: conforming(f.shape) for k, f in shape.fields.items() if f.required}
            optional = {k: conforming(f.shape) | st.none() for k, f in shape.fields.items() if not f.required}
            extra = st.dictionaries(st.sampled_from(["extra", "note", "vendor_field"]), JSON_SCALARS, max_size=2)
            base = st.tuples(st.fixed_dictionaries(required, optional=optional), extra).map(
                lambda pair: {**pair[1], **pair[0]})
    elif isinstance(shape, Arr):
        base = st.lists(conforming(shape.items), max_size=min(4, shape.max_items or 4))
    elif isinstance(shape, Num):
        low = shape.minimum if shape.minimum is not None else -1e12
        high = shape.maximum if shape.maximum is not None else 1e15
        ints = st.integers(int(low), int(high))
        base = ints if shape.integer else ints | st.floats(low, high, allow_nan=False)
    elif isinstance(shape, Str):
        base = st.sampled_from(shape.enum) if shape.enum else st.text(max_size=12)
    elif isinstance(shape, Timestamp):
        base = st.floats(0, 4e9).map(iso)
    elif isinstance(shape, Bool):
        base = st.booleans()
    else:
        raise TypeError(shape)
    return base | st.none() if shape.nullable else base


