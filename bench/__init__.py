"""Benchmarks (``python -m bench.<name>``); each prints what one run measured."""

from __future__ import annotations

import json
import os
from typing import Any


def require_root() -> None:
    """Exit with the reason unless running as root (the benchmarks attach eBPF probes)."""
    if os.geteuid() != 0:
        raise SystemExit("the benchmark attaches eBPF probes: run it as root")


def print_result(result: dict[str, Any], as_json: bool, width: int) -> None:
    """``result`` as indented JSON, or one ``key value`` line per entry, keys padded to ``width``."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:{width}} {v}")


def parse_sweep(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (an argparse ``type``: '' is the empty sweep)."""
    return tuple(int(x) for x in text.split(",") if x.strip())
