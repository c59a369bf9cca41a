"""One way for the benchmarks to write their JSON: ``{"meta": ..., **body}`` with the same ``meta`` fields
(torch, machine, one thread, the benchmark's own fields, the command line) everywhere."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch


def write_bench_json(out: str | Path, name: str, body: dict, **meta_fields) -> Path:
    """Write ``<out>/<name>`` and say so; ``meta_fields`` go into ``meta`` before the command."""
    meta = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        **meta_fields,
        "command": " ".join(["python", *sys.argv]),
    }
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **body}, indent=1))
    print(f"wrote {path}")
    return path
