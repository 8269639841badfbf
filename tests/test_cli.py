"""The command line: doctor's table and exit codes, option precedence."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli
from agent.doctor import CHECKS, run_checks
from tests.harness import REPO

ROWS = ("privileges", "tracefs", "BTF", "kernel headers", "import bcc", "ring buffer", "syscall tracepoints",
        "syscall arguments", "uprobes", "NVML", "compiled modules")


def _doctor(*prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "agent.cli", "doctor"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.ebpf
def test_doctor_ready_on_this_node() -> None:
    r = _doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ROWS:
        assert row in r.stdout
    assert "capture: ready" in r.stdout
    assert all(c.ok for c in run_checks() if c.required)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop privileges")
def test_doctor_fails_without_privileges_and_says_how_to_fix() -> None:
    r = _doctor("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[FAIL] privileges" in r.stdout
    assert "to fix:" in r.stdout and "CAP_BPF" in r.stdout
    assert "capture: cannot work" in r.stdout


def test_every_check_names_a_fix() -> None:
    for check in run_checks():
        if not check.ok:
            assert check.fix, check.name
    assert len(CHECKS) == len(ROWS)


def test_syscall_args_option() -> None:
    assert [cli.exit_args_option(v) for v in ("auto", "exit", "ENTRY")] == [None, True, False]
    with pytest.raises(SystemExit, match="must be exit, entry or auto, not 'kprobe'"):
        cli.exit_args_option("kprobe")


def test_option_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("prometheus_port: 9000\nsample_ratio: 0.5\nport: [8000]\n")
    monkeypatch.setenv("INFERSIGHT_SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("INFERSIGHT_COMM", "vllm,ollama")
    ns = cli.build_parser().parse_args(["run", "--config", str(cfg), "--pid", "42", "--prometheus-port", "0"])
    opts = cli.resolve_run_options(ns)
    assert opts["prometheus_port"] == 0  # command line over YAML
    assert opts["sample_ratio"] == 0.25  # environment over YAML
    assert opts["port"] == (8000,)  # YAML over default
    assert opts["comm"] == ("vllm", "ollama")
    assert opts["pid"] == (42,)
    assert opts["ringbuf_pages"] == 1024  # default


def test_unknown_yaml_option_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prometheus_prot: 1\n")
    ns = cli.build_parser().parse_args(["run", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="unknown options: prometheus_prot"):
        cli.resolve_run_options(ns)


def test_help_lists_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for word in ("run", "doctor", "demo", "top"):
        assert word in r.stdout


def test_buckets_from_yaml_or_json(tmp_path: Path) -> None:
    assert cli.parse_buckets('{"gen_ai.server.time_to_first_token": [0.01, 0.1, 1]}') == {
        "gen_ai.server.time_to_first_token": (0.01, 0.1, 1.0)}
    assert cli.parse_buckets({"http.server.request.duration": [1, 10]}) == {
        "http.server.request.duration": (1.0, 10.0)}
    with pytest.raises(SystemExit, match="not JSON"):
        cli.parse_buckets("[0.1,")
    with pytest.raises(SystemExit, match="lists of bounds"):
        cli.parse_buckets('{"x": 1}')


def test_a_skipped_ebpf_test_fails_under_ci(tmp_path: Path) -> None:
    """The rule in tests/conftest.py, run on a throwaway suite: skips are failures under CI=true only."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (suite / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.ebpf\ndef test_probe():\n    pytest.skip('no tracefs here')\n"
    )
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    ebpf: needs eBPF\n")

    def run(ci: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CI=ci, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                              cwd=suite, capture_output=True, text=True, env=env, timeout=120)

    ci = run("true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert "skipped under CI=true, which is a failure" in ci.stdout
    local = run("")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout


def test_top_options_reach_top() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "top", "--url", "http://127.0.0.1:9/metrics", "--once"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    # an unreachable endpoint is reported by top itself, not refused by the command line
    assert "unrecognized arguments" not in r.stderr
    assert "127.0.0.1:9" in r.stdout + r.stderr
