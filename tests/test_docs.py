"""The docs say what the code does: docs/configuration.md's reference table names every config key
a user can write, with its default, and no other; the README's links reach real pages and anchors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet_common.config import SECTIONS, Config, Shard, load_config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
# Defaults the code works out at start: the table describes them in words, and the dataclass
# must still leave them unset (None), or the words are wrong.
DESCRIBED = {"agent.id": "host name", "persister.parse_workers": "one per core beyond the first, up to 4"}


def user_keys(cls: Any, prefix: str) -> dict[str, Any]:
    """Every key a user writes for the dataclass `cls` -> its default. A FLAT field's keys are
    spelled `<field>_<key>` in the section (persister.metrics_port); a nested dataclass's are
    dotted (mqtt.tls.enabled)."""
    keys: dict[str, Any] = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if f.metadata.get("flat"):
            keys.update({f"{prefix}.{f.name}_{inner.name}": getattr(value, inner.name)
                         for inner in dataclasses.fields(value)})
        elif dataclasses.is_dataclass(value) and not isinstance(value, Shard):
            keys.update(user_keys(type(value), f"{prefix}.{f.name}"))
        else:
            keys[f"{prefix}.{f.name}"] = value
    return keys


def all_keys() -> dict[str, Any]:
    return {k: v for name, cls in SECTIONS.items() for k, v in user_keys(cls, name).items()}


def shown(value: Any) -> str:
    """A default as the reference table writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"  # 30.0 is written 30
    if isinstance(value, Shard):
        return f'`"{value}"`'
    if isinstance(value, dict):
        return ", ".join(f"{k} {shown(v)}" for k, v in value.items()) or "(none)"
    return f"`{value}`"


def reference_table() -> dict[str, str]:
    """docs/configuration.md's `| key | default | meaning |` rows: key -> default cell."""
    rows: dict[str, str] = {}
    in_table = False
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("| key | default | meaning |"):
            in_table = True
        elif in_table and not line.startswith("|"):
            break
        elif in_table and not line.startswith("|---"):
            key, default, _meaning = (cell.strip() for cell in line.strip("|").split("|", 2))
            assert re.fullmatch(r"`[a-z_]+(\.[a-z_]+)+`", key), f"one key a row, in backticks: {line}"
            assert key.strip("`") not in rows, f"{key} is listed twice"
            rows[key.strip("`")] = default
    return rows


def test_every_key_is_a_key_the_loader_takes_with_that_default(tmp_path: Path) -> None:
    """The keys enumerated here are what load_config accepts (each written with its default loads
    and reads back the same through Config.get), so the checks below cover the real config."""
    defaults = Config()
    for key, value in all_keys().items():
        section, rest = key.split(".", 1)
        node: dict[str, Any] = {}
        inner = node
        parts = rest.split(".")
        for part in parts[:-1]:
            inner = inner.setdefault(part, {})
        inner[parts[-1]] = str(value) if isinstance(value, Shard) else value
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({section: node}))
        assert load_config(str(path), env={}).get(key) == defaults.get(key) == value, key


def test_the_reference_names_every_key_with_its_default() -> None:
    """Each key a user can write is a row of docs/configuration.md's table, with its default."""
    rows = reference_table()
    for key, value in all_keys().items():
        assert key in rows, f"{key} is missing from the table in docs/configuration.md"
        if key in DESCRIBED:
            assert value is None, f"{key}: the default is now {value!r}; write it in the table"
            assert rows[key] == DESCRIBED[key], key
        else:
            assert rows[key] == shown(value), f"{key}: the table says {rows[key]}, the code {shown(value)}"


def test_the_reference_names_no_key_the_config_lacks() -> None:
    """No row of the table is a key the loader would refuse."""
    unknown = sorted(set(reference_table()) - set(all_keys()))
    assert unknown == [], f"docs/configuration.md names keys the config does not have: {unknown}"


def headings_slugs(path: Path) -> set[str]:
    """The anchors MkDocs (and GitHub) give the headings of a Markdown file."""
    slugs, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.*)", line)):
            slugs.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\]\(((?!https?:)[^)]+)\)",
                                                          (ROOT / "README.md").read_text()))))
def test_every_link_in_the_readme_reaches_a_file_and_anchor(target: str) -> None:
    """mkdocs --strict checks the links inside docs/; this checks the README's, which it does not build."""
    file, _, anchor = target.partition("#")
    path = ROOT / file if file else ROOT / "README.md"
    assert path.exists(), f"README.md links to {target}, which does not exist"
    if anchor:
        assert anchor in headings_slugs(path), f"README.md links to {target}: no such heading"
