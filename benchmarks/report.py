"""Shared output of the benchmark scripts: a Markdown table on stdout, optionally JSON on disk,
with the machine it ran on recorded once here."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Python, torch, processor, CPUs, threads, peak memory and the command line of this run."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "argv": sys.argv,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env.update(torch=torch.__version__, threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
    return env


def emit(name: str, meta: dict[str, Any], results: Any, table: str, out: Path | None) -> dict[str, Any]:
    print(table)
    record = {"benchmark": name, "meta": {**environment(), **meta}, "results": results}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {out}")
    return record
