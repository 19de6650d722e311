"""Shared output of the benchmark scripts: a Markdown table on stdout, optionally JSON on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(name: str, meta: dict[str, Any], results: Any, table: str, out: Path | None) -> dict[str, Any]:
    print(table)
    record = {"benchmark": name, "meta": meta, "results": results}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {out}")
    return record
