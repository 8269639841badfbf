"""The agent image, built with podman from the repository's Dockerfile, and run.

Markers: ``slow`` and ``container`` (needs root, podman, runc and debootstrap, and network access
to a Debian mirror and PyPI while building). No Docker engine is involved: the base image
``debian:bookworm-slim`` is made with ``debootstrap --variant=minbase`` and ``podman import``
(FIELD-NOTES §5), and ``podman build --pull=never`` never pulls from a registry.

Cost: the debootstrap base is cached in ``$INFERSIGHT_TEST_CACHE`` (default
/var/cache/infersight-test) as a tarball and in podman's image store, so a machine pays for it once
(about 30 s and 200 MB). The image build reuses podman's layer cache; a changed agent source
re-runs the pip install layer (about 1 minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import native
from tests.conftest import IN_CI, REPO

# A first build on a fresh machine (the base image, apt, pip and the compiled modules, no
# layer cached) runs in the first test's setup and takes minutes: past the suite's 300 s.
pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(1500)]

CACHE = Path(os.environ.get("INFERSIGHT_TEST_CACHE", "/var/cache/infersight-test"))
MIRROR = os.environ.get("INFERSIGHT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_IMAGE = "debian:bookworm-slim"
IMAGE = "localhost/infersight:test"
#: The chart's default capability set (helm/infersight/templates/_helpers.tpl).
CHART_CAPS = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE"]
#: Trusted for PyPI inside the build when present (a TLS-inspecting proxy's CA is in there).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = """\
# Written by tests/test_image.py: podman settings that work without systemd and in nested setups.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install -y podman runc debootstrap)"
    return None


def sh(
    cmd: list[str], env: dict[str, str], timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    reason = unavailable_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"container tests cannot run under CI: {reason}")
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def ensure_base_image(env: dict[str, str]) -> None:
    """Import the debootstrapped base once; keep its tarball so a wiped image store is cheap."""
    if sh(["podman", "image", "exists", BASE_IMAGE], env, 60, check=False).returncode == 0:
        return
    tarball = CACHE / "bookworm-minbase.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs.partial"
        shutil.rmtree(rootfs, ignore_errors=True)
        sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR], env, 1200)
        partial = tarball.with_suffix(".tar.partial")
        sh(["tar", "-C", str(rootfs), "-cf", str(partial), "."], env, 600)
        partial.rename(tarball)  # only a complete tarball is ever reused
        shutil.rmtree(rootfs, ignore_errors=True)
    sh(["podman", "import", str(tarball), BASE_IMAGE], env, 600)


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    ensure_base_image(podman_env)
    cmd = ["podman", "build", "--pull=never", "-t", IMAGE, "-f", str(REPO / "Dockerfile")]
    if HOST_CA_BUNDLE.exists():
        cmd += ["--secret", f"id=ca-bundle,src={HOST_CA_BUNDLE}"]
    sh([*cmd, str(REPO)], podman_env, 1500)
    return IMAGE


def run_in(
    env: dict[str, str], image: str, *args: str, options: tuple[str, ...] = (), timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``infersight ARGS`` in a fresh container without network."""
    cmd = ["podman", "run", "--rm", "--network", "none", *options, "--entrypoint", "infersight", image, *args]
    return sh(cmd, env, timeout, check=False)


def doctor_rows(output: str) -> dict[str, str]:
    """Check name -> status ("ok", "FAIL", "warn") from doctor's table."""
    rows = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("[") and "]" in line:
            status, rest = line[1:].split("]", 1)
            name = rest.strip().split("  ")[0]
            rows[name] = status.strip()
    return rows


def test_image_holds_bcc_and_the_agent_and_nothing_more(podman_env: dict[str, str], image: str) -> None:
    info = json.loads(sh(["podman", "image", "inspect", image], podman_env, 60).stdout)[0]
    config = info["Config"]
    assert config["Entrypoint"] == ["infersight", "run"]
    assert config.get("User", "") in ("", "0", "root")
    assert "9464/tcp" in config.get("ExposedPorts", {})
    probe = (
        "import importlib.util, shutil, bcc, agent.cli, probes, collectors;"
        "print('test-extras', [m for m in ('pytest', 'hypothesis', 'mypy', 'ruff') if importlib.util.find_spec(m)]);"
        "print('compilers', [c for c in ('gcc', 'cc', 'clang', 'make', 'pip') if shutil.which(c)]);"
        "print('bpf-sources', sorted(p.name for p in __import__('pathlib').Path(probes.__file__).parent.glob('*.bpf.c')))"
    )
    result = sh(
        ["podman", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", probe],
        podman_env,
        120,
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["test-extras"] == "[]", "the test extras must not be installed"
    assert lines["compilers"] == "[]", "BCC compiles with its bundled LLVM; no toolchain in the image"
    assert "sockets.bpf.c" in lines["bpf-sources"], "the probe sources ship as package data"


def test_help(podman_env: dict[str, str], image: str) -> None:
    result = run_in(podman_env, image, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "doctor"):
        assert command in result.stdout


def test_doctor_names_what_a_bare_container_lacks(podman_env: dict[str, str], image: str) -> None:
    # No capabilities beyond podman's defaults, no host mounts: capture cannot work, and doctor
    # must say why rather than crash.
    result = run_in(podman_env, image, "doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = doctor_rows(result.stdout)
    assert rows["import bcc"] == "ok"
    assert rows["privileges"] == "FAIL"
    assert rows["tracefs"] == "FAIL"
    assert rows["kernel headers"] == "FAIL"
    # the image runs the per-record path compiled, as the benchmarks in README measure it
    assert rows["compiled modules"] == "ok", result.stdout
    n = len(native.SOURCES)
    assert f"{n} of {n} per-record modules compiled" in result.stdout
    assert "to fix:" in result.stdout
    assert "mount the host's /sys/kernel/tracing" in result.stdout
    assert "mount /lib/modules and /usr/src" in result.stdout
    assert "capture: cannot work" in result.stdout


def containerd_like_seccomp_profile(path: Path) -> Path:
    """podman's default seccomp profile with containerd's rules for bpf and perf_event_open.

    containerd's RuntimeDefault (contrib/seccomp, since containerd PR #7301, 2022, also in 1.6.x)
    allows ``bpf`` to a holder of CAP_BPF and ``perf_event_open`` to a holder of CAP_PERFMON;
    the containers/common profile podman uses here allows both only with CAP_SYS_ADMIN. The test
    grants the chart's capabilities under the containerd rules, as a kubelet with containerd would.
    """
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    # containers/common answers bpf and perf_event_open with an explicit EPERM rule for holders of
    # no CAP_SYS_ADMIN, which would win over an allow rule; containerd has no such rule.
    for rule in profile["syscalls"]:
        if rule.get("action") == "SCMP_ACT_ERRNO":
            rule["names"] = [n for n in rule["names"] if n not in ("bpf", "perf_event_open")]
    profile["syscalls"] = [rule for rule in profile["syscalls"] if rule["names"]]
    profile["syscalls"].append(
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}}
    )
    profile["syscalls"].append(
        {"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_PERFMON"]}}
    )
    path.write_text(json.dumps(profile))
    return path


def daemonset_like_options(seccomp: Path | str) -> tuple[str, ...]:
    """What the chart's DaemonSet gives the container, in podman's words."""
    caps = ",".join(CHART_CAPS)
    mounts = [
        "/sys/kernel/tracing:/sys/kernel/tracing",
        "/sys/fs/bpf:/sys/fs/bpf",
        "/lib/modules:/lib/modules:ro",
        "/usr/src:/usr/src:ro",
        "/proc:/host/proc:ro",
    ]
    opts = ["--pid", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--cap-add", caps]
    opts += ["--security-opt", "no-new-privileges", "--security-opt", f"seccomp={seccomp}"]
    for m in mounts:
        opts += ["-v", m]
    return tuple(opts)


@pytest.fixture
def seccomp_profiles(tmp_path: Path) -> Iterator[dict[str, Path]]:
    if not Path("/usr/share/containers/seccomp.json").exists():
        pytest.skip("no /usr/share/containers/seccomp.json (containers-common)")
    yield {"containerd-like": containerd_like_seccomp_profile(tmp_path / "containerd-like.json")}


@pytest.mark.ebpf
def test_chart_capabilities_load_bpf_under_a_runtime_default_seccomp_profile(
    podman_env: dict[str, str], image: str, seccomp_profiles: dict[str, Path]
) -> None:
    result = run_in(
        podman_env, image, "doctor", options=daemonset_like_options(seccomp_profiles["containerd-like"])
    )
    rows = doctor_rows(result.stdout)
    assert rows["privileges"] == "ok", result.stdout
    assert rows["tracefs"] == "ok", result.stdout
    assert rows["syscall tracepoints"] == "ok", result.stdout
    # A real BPF map and program created and loaded with no CAP_SYS_ADMIN.
    assert rows["ring buffer"] == "ok", result.stdout + result.stderr
    assert "CAP_SYS_ADMIN" not in result.stdout


@pytest.mark.ebpf
def test_podman_default_seccomp_needs_sys_admin_for_bpf(podman_env: dict[str, str], image: str) -> None:
    # What docs/deploy.md tells CRI-O and podman users: the containers/common profile (Debian 12's)
    # refuses bpf() without CAP_SYS_ADMIN even when CAP_BPF is held.
    opts = daemonset_like_options("/usr/share/containers/seccomp.json")
    result = run_in(podman_env, image, "doctor", options=opts)
    assert doctor_rows(result.stdout)["ring buffer"] == "FAIL", result.stdout
    assert "Operation not permitted" in result.stderr
    with_admin = run_in(podman_env, image, "doctor", options=(*opts, "--cap-add", "SYS_ADMIN"))
    assert doctor_rows(with_admin.stdout)["ring buffer"] == "ok", with_admin.stdout + with_admin.stderr


@pytest.mark.ebpf
def test_agent_captures_requests_under_the_chart_security_settings(
    podman_env: dict[str, str], image: str, seccomp_profiles: dict[str, Path], tmp_path: Path
) -> None:
    """The image's entrypoint, as the DaemonSet runs it (read-only root, the chart's capabilities,
    host PID, the chart's mounts), traces a real streaming server on the host."""
    import httpx

    from tests.harness import start_demo_server, wait_for

    srv = start_demo_server(tmp_path)
    name = f"infersight-test-{os.getpid()}"
    out, err = tmp_path / "records.jsonl", tmp_path / "agent.log"
    opts = daemonset_like_options(seccomp_profiles["containerd-like"])
    cmd = ["podman", "run", "--rm", "--name", name, "--network", "host", "-e", "INFERSIGHT_PROC=/host/proc"]
    cmd += [
        *opts,
        image,
        "--pid",
        str(srv.pid),
        "--jsonl",
        "-",
        "--prometheus-port",
        "0",
        "--duration",
        "180",
    ]
    try:
        with open(out, "wb") as o, open(err, "wb") as e:
            agent = subprocess.Popen(cmd, env=podman_env, stdout=o, stderr=e)
        try:
            wait_for(
                lambda: "attached to 1 target" in err.read_text(), 120, 0.2, "agent attached in the container"
            )
            body = {
                "model": "image-test",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 4,
            }
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                for _ in range(3):
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        for _chunk in r.iter_bytes():
                            pass

            def records() -> list[dict[str, object]]:
                lines = [line for line in out.read_text().splitlines() if line.strip()]
                return [r for r in map(json.loads, lines) if r.get("gen_ai.request.model") == "image-test"]

            got = wait_for(lambda: len(records()) >= 3 and records(), 30, 0.2, "3 records on stdout")
            assert all(r["streaming"] is True for r in got)
        finally:
            sh(["podman", "stop", "-t", "20", name], podman_env, 60, check=False)
            agent.wait(60)
        assert "Traceback" not in err.read_text()
    finally:
        srv.stop()
