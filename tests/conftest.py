"""Shared test plumbing.

Tests marked ``ebpf`` load real BPF programs. Where that cannot work (not root,
no tracefs, no BCC) they skip, except under ``CI=true``, where a skipped eBPF
test is reported as a failure: CI must prove the probes work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def ebpf_unavailable_reason() -> str | None:
    """Why real eBPF tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not root"
    if not Path("/sys/kernel/tracing/events/syscalls").is_dir():
        return "tracefs not mounted at /sys/kernel/tracing"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "python module bcc (Debian python3-bpfcc) not importable"
    return None


@pytest.fixture(scope="session")
def ebpf() -> None:
    """Skip (or, under CI, fail) when real eBPF cannot run."""
    reason = ebpf_unavailable_reason()
    if reason:
        pytest.skip(f"eBPF unavailable: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    # A compiled module built from an older source would be what the tests
    # import (Python prefers the extension): refuse to test it.
    from agent import native

    st = native.status()
    stale = [m for m, v in st.items() if v == "stale"]
    if stale:
        raise pytest.UsageError(
            "compiled modules are older than their sources: " + ", ".join(stale)
            + "; run .venv/bin/python -m agent.native build (scripts/test.sh does)"
        )
    # Under CI the suite runs what setup built: the figures in README are for compiled modules.
    if IN_CI:
        missing = [m for m, v in st.items() if v != "compiled"]
        if missing:
            raise pytest.UsageError("CI=true but these modules are not compiled: " + ", ".join(missing))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Every eBPF test requests the `ebpf` fixture first, so that it skips
        # (or fails under CI) before it starts servers or loads programs.
        names = getattr(item, "fixturenames", None)
        if "ebpf" in item.keywords and names is not None and "ebpf" not in names:
            names.insert(0, "ebpf")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and "ebpf" in item.keywords:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"eBPF test skipped under CI=true, which is a failure: {reason}"


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter that runs the agent (the repo's .venv when present)."""
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
