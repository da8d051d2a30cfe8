"""docs/asyncapi.yaml against the AsyncAPI specification itself, as the official parser
(@asyncapi/parser, pinned in tools/asyncapi/package-lock.json) reads it. tests/test_asyncapi.py
holds the document to the code; these hold it to the spec. `make test` installs the parser
(scripts/ensure-asyncapi.sh: npm ci); without Node.js, npm or the registry these tests skip, saying why."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

# Each run starts Node and the parser (about 2 s): not for `make test-fast`.
pytestmark = pytest.mark.slow

TOOLS = ROOT / "tools" / "asyncapi"
VALIDATOR = TOOLS / "validate.mjs"
PARSER_PKG = TOOLS / "node_modules" / "@asyncapi" / "parser" / "package.json"
DOC = ROOT / "docs" / "asyncapi.yaml"


def validator() -> list[str]:
    """The command that runs tools/asyncapi/validate.mjs, or skip saying what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed, so docs/asyncapi.yaml cannot be checked with the official "
                    "AsyncAPI parser (install Node.js 18+ and npm, then run scripts/ensure-asyncapi.sh)")
    if not PARSER_PKG.exists():
        unavailable = TOOLS / ".unavailable"
        why = unavailable.read_text(encoding="utf-8").strip() if unavailable.exists() else "it was never installed"
        pytest.skip(f"@asyncapi/parser is not installed in tools/asyncapi ({why}); "
                    "run scripts/ensure-asyncapi.sh (make test does)")
    lock = json.loads((TOOLS / "package-lock.json").read_text(encoding="utf-8"))
    pinned = lock["packages"]["node_modules/@asyncapi/parser"]["version"]
    installed = json.loads(PARSER_PKG.read_text(encoding="utf-8"))["version"]
    if installed != pinned:
        pytest.skip(f"tools/asyncapi has @asyncapi/parser {installed}, the lock pins {pinned}: "
                    "run scripts/ensure-asyncapi.sh (make test does)")
    return [node, str(VALIDATOR)]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*validator(), str(path)], capture_output=True, text=True, timeout=120)


def test_the_official_parser_accepts_the_document() -> None:
    """@asyncapi/parser parses docs/asyncapi.yaml with no diagnostic of severity error."""
    done = validate(DOC)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid AsyncAPI" in done.stdout


def test_the_validation_catches_an_operation_field_in_a_message_binding(tmp_path: Path) -> None:
    """Put back what the parser once refused — MessageExpiryInterval in the request's MQTT message
    binding, where MQTT bindings 0.2.0 do not have it — and the validation fails, naming it."""
    doc = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    binding = doc["components"]["messages"]["request"]["bindings"]["mqtt"]
    binding["messageExpiryInterval"] = {"type": "integer", "description": "Seconds until expires_at."}
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    done = validate(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT PARSED" in done.stdout
    assert "components/messages/request/bindings/mqtt/messageExpiryInterval" in done.stdout, done.stdout
