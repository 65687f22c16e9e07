"""docs/bundle.schema.json is generated from the manifest models and must match them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_matches_the_models() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_bundle_schema.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = json.loads((ROOT / "docs" / "bundle.schema.json").read_text())
    objects = [d for d in schema["$defs"].values() if d.get("type") == "object"]
    assert objects
    assert schema["additionalProperties"] is False
    for definition in objects:
        if "properties" in definition:
            assert definition["additionalProperties"] is False, definition["title"]
