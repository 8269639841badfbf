"""bench/gpu_check.py off a GPU: its agent part runs end to end (real eBPF, the real agent), and
its GPU checks fail rather than pass with nothing to check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

PLUMBING = (
    "agent: client events per request",
    "agent: exit 0 on SIGINT",
    "agent: one record per request",
    "agent: model",
    "agent: output tokens",
    "agent: TTFT within 2 ms of the server's first write",
    "agent: the prompt appears in no output",
)
GPU = (
    "agent: every record joined with the GPU",
    "agent: CUDA launches in each record's window",
    "agent: the records' launches add up to the probe's total",
    "agent: every record has its process's GPU memory peak",
)


def _cuda_here() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                       capture_output=True, timeout=120)
    return r.returncode == 0


@pytest.mark.ebpf
@pytest.mark.slow
def test_agent_part_runs_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--part", "agent", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == out
    checks = {c["check"]: c for c in out["checks"]}
    for name in PLUMBING:
        assert checks[name]["ok"] is True, checks[name]
    records = [json.loads(line) for line in (tmp_path / "agent.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(rec["output_events"] == 48 for rec in records)
    if _cuda_here():
        assert r.returncode == 0, out["failed"]
    else:
        assert [checks[name]["ok"] for name in GPU] == [False] * len(GPU)
        assert sorted(out["failed"]) == sorted(GPU)
        assert r.returncode == 1
