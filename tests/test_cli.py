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


@pytest.fixture(scope="module")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fake libnvidia-ml.so.1, under a path no loader searches (as a mounted driver root
    is), and a scenario with one GPU."""
    from tests.fake_nvml import FakeNvmlUnavailable, Scenario, build

    root = tmp_path_factory.mktemp("driver-root")
    (root / "usr" / "lib").mkdir(parents=True)
    try:
        lib = build(root / "usr" / "lib")
    except FakeNvmlUnavailable as e:
        pytest.skip(f"fake NVML cannot be built: {e}")
    scenario = Scenario(root / "scenario.txt")
    scenario.set({"driver": 1, "gpus": 1, "gpu0.uuid": "GPU-cli-0", "gpu0.name": "NVIDIA H100 80GB HBM3",
                  "gpu0.pci": "00000000:17:00.0", "gpu0.mem_total": 85_899_345_920, "gpu0.util_gpu": 42})
    return lib, scenario.path


def test_doctor_loads_the_nvml_library_the_agent_is_told_to(fake_nvml: tuple[Path, Path]) -> None:
    lib, scenario = fake_nvml
    env = dict(os.environ, PYTHONPATH=str(REPO), FAKE_NVML_SCENARIO=str(scenario))
    env.pop("INFERSIGHT_NVML_LIBRARY", None)
    args = [sys.executable, "-m", "agent.cli", "doctor"]
    plain = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert "libnvidia-ml.so.1 not loadable" in plain.stdout  # no driver on this machine's search path
    told = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(env, INFERSIGHT_NVML_LIBRARY=str(lib)))
    assert f"[ok  ] NVML                 {lib} initialises" in told.stdout, told.stdout


def test_run_collects_from_the_named_nvml_library(fake_nvml: tuple[Path, Path]) -> None:
    """`--nvml-library` (and its variable, which the chart sets) reaches the NVML collector."""
    lib, scenario = fake_nvml
    code = (
        "import sys\n"
        "from agent import cli\n"
        "opts = cli.resolve_run_options(cli.build_parser().parse_args(sys.argv[1:]))\n"
        "sources = cli.start_gpu_sources({**opts, 'cuda': 'off'})\n"
        "print([(d.uuid, d.name) for d in sources['nvml'].devices()])\n"
        "for s in sources.values(): s.stop()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), FAKE_NVML_SCENARIO=str(scenario))
    env.pop("INFERSIGHT_NVML_LIBRARY", None)
    found = "[('GPU-cli-0', 'NVIDIA H100 80GB HBM3')]"
    cases = [
        (["run", "--nvml-library", str(lib)], {}, found),
        (["run"], {"INFERSIGHT_NVML_LIBRARY": str(lib)}, found),
        (["run"], {}, "[]"),  # not on the loader's path: no GPU, and nothing else fails
    ]
    for argv, extra, expected in cases:
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=120, env=dict(env, **extra))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == expected, (argv, extra, r.stdout, r.stderr)
