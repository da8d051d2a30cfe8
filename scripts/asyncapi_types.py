"""Write the built-in types' JSON Schemas (fleet_common.datatypes) into docs/asyncapi.yaml.

    .venv/bin/python scripts/asyncapi_types.py          # rewrite the generated block
    .venv/bin/python scripts/asyncapi_types.py --check  # exit 1 if the file is not what it would write

tests/test_asyncapi.py compares the document's schemas with fleet_common.datatypes, so an edit
to either that is not carried to the other fails the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from fleet_common.datatypes import BUILTIN, EXAMPLES, json_schemas

DOC = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
BEGIN = "    # >>> built-in types: generated from fleet_common/datatypes.py by scripts/asyncapi_types.py; do not edit\n"
END = "    # <<< built-in types\n"


def schema_name(type_: str, part: str) -> str:
    """cpu, data -> CpuData; os_info, params -> OsInfoParams."""
    return "".join(word.capitalize() for word in type_.split("_")) + part.capitalize()


def block() -> str:
    schemas: dict[str, Any] = {}
    by_type: dict[str, Any] = {}
    for type_, parts in json_schemas().items():
        t = BUILTIN[type_]
        schemas[schema_name(type_, "params")] = {"description": f"The params of a {type_} request.",
                                                 **parts["params"]}
        schemas[schema_name(type_, "data")] = {"description": t.description, **parts["data"],
                                               "examples": [EXAMPLES[type_]]}
        by_type[type_] = {"params": {"$ref": f"#/components/schemas/{schema_name(type_, 'params')}"},
                          "data": {"$ref": f"#/components/schemas/{schema_name(type_, 'data')}"},
                          "maxPayloadBytes": t.max_payload_bytes}
    schemas["BuiltInTypes"] = {
        "description": "For each built-in type, the params of its requests and the data of its ok answers. "
                       "A persister refuses an answer whose data does not conform (bad_data, naming the "
                       "field) or whose payload is larger than maxPayloadBytes; extra fields are allowed.",
        "x-types": by_type}
    text = yaml.safe_dump(schemas, sort_keys=False, width=110, allow_unicode=True)
    return BEGIN + "".join(f"    {line}\n" if line else "\n" for line in text.splitlines()) + END


def render(current: str) -> str:
    if BEGIN in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block() + tail
    return current.rstrip("\n") + "\n" + block()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the file is up to date")
    args = parser.parse_args()
    current = DOC.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{DOC} is out of date: run scripts/asyncapi_types.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
