"""Write docs/bundle.schema.json from the manifest models (``--check`` to verify it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_agent.protocol.manifest import manifest_json_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "bundle.schema.json"


def render() -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgefleet model bundle manifest (bundle.json)",
        **manifest_json_schema(),
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run scripts/gen_bundle_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
