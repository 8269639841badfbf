"""PID → container from cgroup paths: recorded ``/proc/<pid>/cgroup`` contents, then real cgroups.

The real-cgroup tests create kubelet-style directories in this machine's cgroup
hierarchies, move a real ``sleep`` into them and read its ``/proc/<pid>/cgroup``
back through :func:`container_of`. They nest everything under a uniquely named
root (as a kubelet ``--cgroup-root`` would) so that concurrent runs never share
a directory, and they remove what they created.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.selfmetrics import SelfMetrics
from collectors.cgroup import (
    ContainerRef,
    PidResolver,
    PidResolverConfig,
    container_of,
    parse_proc_cgroup,
    process_start_time,
)

CID_A = "3b1f" + "a" * 56 + "0c9d"
CID_B = "9e0d" + "4" * 58 + "17"
CID_C = "0123456789abcdef" * 4
UID = "0f6a7f3e-5b8c-4d1a-9e2f-3c4b5a6d7e8f"
UID_ = UID.replace("-", "_")
STATIC_UID = "6d9f2c0e5a1b4c3d8e7f9a0b1c2d3e4f"

V1_OTHER = "\n".join(
    f"{n}:{c}:/" for n, c in ((11, "perf_event"), (10, "net_cls,net_prio"), (9, "hugetlb"), (8, "rdma"))
)

# Recorded shapes of /proc/<pid>/cgroup (IDs replaced), with what they must resolve to.
RECORDED: list[tuple[str, str, ContainerRef | None]] = [
    (
        "v2 systemd containerd burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", UID, "burstable"),
    ),
    (
        "v2 systemd containerd guaranteed",
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", UID, "guaranteed"),
    ),
    (
        "v2 systemd cri-o besteffort",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID_B}.scope\n",
        ContainerRef(CID_B, "cri-o", UID, "besteffort"),
    ),
    (
        "v2 systemd cri-o conmon is not the container",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID_B}.scope\n",
        None,
    ),
    (
        "v2 cgroupfs containerd burstable",
        f"0::/kubepods/burstable/pod{UID}/{CID_C}\n",
        ContainerRef(CID_C, "unknown", UID, "burstable"),
    ),
    (
        "v2 cgroupfs guaranteed",
        f"0::/kubepods/pod{UID}/{CID_C}\n",
        ContainerRef(CID_C, "unknown", UID, "guaranteed"),
    ),
    (
        "v2 kind --cgroup-root=/kubelet",
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", UID, "besteffort"),
    ),
    (
        "v2 static pod (hash UID)",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", STATIC_UID, "burstable"),
    ),
    (
        "v2 container with its own sub-cgroup",
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID_A}.scope/init.scope\n",
        ContainerRef(CID_A, "containerd", UID, "guaranteed"),
    ),
    (
        "v1 cgroupfs containerd burstable",
        f"12:memory:/kubepods/burstable/pod{UID}/{CID_C}\n{V1_OTHER}\n"
        f"2:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID_C}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID_C}\n0::/\n",
        ContainerRef(CID_C, "unknown", UID, "burstable"),
    ),
    (
        "v1 systemd docker besteffort (dockershim)",
        f"{V1_OTHER}\n5:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID_B}.scope\n"
        f"1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID_B}.scope\n",
        ContainerRef(CID_B, "docker", UID, "besteffort"),
    ),
    (
        "v1 docker outside kubernetes",
        f"{V1_OTHER}\n4:memory:/docker/{CID_C}\n1:name=systemd:/docker/{CID_C}\n",
        ContainerRef(CID_C, "docker", None, None),
    ),
    (
        "v2 docker systemd outside kubernetes",
        f"0::/system.slice/docker-{CID_C}.scope\n",
        ContainerRef(CID_C, "docker", None, None),
    ),
    (
        "v2 podman",
        f"0::/machine.slice/libpod-{CID_C}.scope/container\n",
        ContainerRef(CID_C, "podman", None, None),
    ),
    (
        "v2 read from a private cgroup namespace, other QoS class",
        f"0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", UID, "besteffort"),
    ),
    (
        "v2 read from a private cgroup namespace, same QoS class, cgroupfs driver",
        f"0::/../../pod{UID}/{CID_C}\n",
        ContainerRef(CID_C, "unknown", UID, None),
    ),
    (
        "v2 read from a private cgroup namespace, guaranteed pod, systemd driver",
        f"0::/../../../kubepods-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", UID, "guaranteed"),
    ),
    (
        "v2 read from a private cgroup namespace, same pod",
        f"0::/../cri-containerd-{CID_A}.scope\n",
        ContainerRef(CID_A, "containerd", None, None),
    ),
    ("v2 login session", "0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ("v2 containerd daemon itself", "0::/system.slice/containerd.service\n", None),
    ("v2 root (private cgroup namespace)", "0::/\n", None),
    (
        "v1 hybrid with a 32-digit non-container id",
        "4:memory:/process_api/44331495c1aa29ce09e44475319ad8ab\n3:cpuset:/\n0::/\n",
        None,
    ),
    ("garbage", "not a cgroup file\n\n::\n", None),
    (
        "pod directory outside kubepods is not a pod",
        f"0::/somewhere/pod{UID}/{CID_C}\n",
        ContainerRef(CID_C, "unknown", None, None),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in RECORDED], ids=[n for n, _, _ in RECORDED])
def test_parse_recorded_proc_cgroup(text: str, expected: ContainerRef | None) -> None:
    assert parse_proc_cgroup(text) == expected


def _write_proc(root: Path, pid: int, cgroup: str, start: int, comm: str = "python3") -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(cgroup)
    # A real stat line, with a comm that contains the characters that break naive splitting.
    rest = " ".join(["S", "1", str(pid)] + ["0"] * 16 + [str(start)] + ["0"] * 30)
    (d / "stat").write_text(f"{pid} ({comm}) {rest}\n")


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in RECORDED], ids=[n for n, _, _ in RECORDED])
def test_container_of_through_a_proc_root(tmp_path: Path, text: str, expected: ContainerRef | None) -> None:
    _write_proc(tmp_path, 4242, text, start=12345)
    assert container_of(4242, proc=str(tmp_path)) == expected


def test_container_of_missing_process_is_none(tmp_path: Path) -> None:
    assert container_of(999999, proc=str(tmp_path)) is None
    assert process_start_time(999999, proc=str(tmp_path)) is None


def test_start_time_survives_hostile_comm(tmp_path: Path) -> None:
    _write_proc(tmp_path, 7, "0::/\n", start=987654, comm="a) b (c) 1 2")
    assert process_start_time(7, proc=str(tmp_path)) == 987654
    # And the real /proc agrees with itself for this process.
    assert process_start_time(os.getpid()) == process_start_time(os.getpid())
    assert isinstance(process_start_time(os.getpid()), int)


def test_resolver_does_not_return_a_stale_container_after_pid_reuse(tmp_path: Path) -> None:
    first = f"0::/kubepods/burstable/pod{UID}/{CID_C}\n"
    second = f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID_A}.scope\n"
    now = [0.0]
    resolver = PidResolver(PidResolverConfig(start_recheck_s=1.0), proc=str(tmp_path), metrics=SelfMetrics(),
                           clock=lambda: now[0])
    _write_proc(tmp_path, 100, first, start=5000)
    ref = resolver.resolve(100)
    assert ref is not None and ref.container_id == CID_C
    # Same PID, new process (a later start time), in another container: seen once the
    # start time is read again (a PID is not recycled within the recheck time)
    _write_proc(tmp_path, 100, second, start=9000)
    now[0] = 1.5
    ref = resolver.resolve(100)
    assert ref is not None and ref.container_id == CID_A
    now[0] = 3.0
    # The process exits: nothing, even though the cache still holds its entry.
    for name in ("cgroup", "stat"):
        (tmp_path / "100" / name).unlink()
    assert resolver.resolve(100) is None


def test_resolver_remembers_a_vanished_process_for_the_recheck_time(tmp_path: Path) -> None:
    # A late record of a process that has exited asks again and again: /proc is read
    # once per start_recheck_s, as for a live process.
    now = [0.0]
    resolver = PidResolver(PidResolverConfig(start_recheck_s=1.0), proc=str(tmp_path), metrics=SelfMetrics(),
                           clock=lambda: now[0])
    assert resolver.resolve(300) is None
    _write_proc(tmp_path, 300, f"0::/kubepods/burstable/pod{UID}/{CID_C}\n", start=4000)
    now[0] = 0.5
    assert resolver.resolve(300) is None  # not read again yet
    now[0] = 1.5
    ref = resolver.resolve(300)
    assert ref is not None and ref.container_id == CID_C


def test_resolver_cache_is_bounded_and_counts_evictions(tmp_path: Path) -> None:
    metrics = SelfMetrics()
    resolver = PidResolver(PidResolverConfig(max_entries=2), proc=str(tmp_path), metrics=metrics)
    for pid in (1, 2, 3):
        _write_proc(tmp_path, pid, f"0::/kubepods/pod{UID}/{CID_C}\n", start=pid * 10)
        assert resolver.resolve(pid) is not None
    assert len(resolver) == 2
    assert metrics.get("infersight.cache.evictions", (("cache", "pid_container"),)) == 1


def test_resolver_cache_evicts_the_least_recently_asked(tmp_path: Path) -> None:
    # A hit makes its process the most recent: the next eviction takes the other one.
    metrics = SelfMetrics()
    resolver = PidResolver(PidResolverConfig(max_entries=2), proc=str(tmp_path), metrics=metrics,
                           clock=lambda: 0.0)
    for pid in (1, 2):
        _write_proc(tmp_path, pid, f"0::/kubepods/pod{UID}/{CID_C}\n", start=pid * 10)
        assert resolver.resolve(pid) is not None
    assert resolver.resolve(1) is not None  # a hit: 1 is now the most recent
    _write_proc(tmp_path, 3, f"0::/kubepods/pod{UID}/{CID_C}\n", start=30)
    assert resolver.resolve(3) is not None  # evicts 2
    for pid in (1, 2):
        (tmp_path / str(pid) / "cgroup").write_text("0::/\n")
    assert resolver.resolve(1) is not None  # still cached
    assert resolver.resolve(2) is None  # read again: no longer in a container
    assert metrics.get("infersight.cache.evictions", (("cache", "pid_container"),)) == 2


def test_resolver_serves_hits_from_cache_and_rechecks_negatives_after_ttl(tmp_path: Path) -> None:
    now = [1000.0]
    resolver = PidResolver(
        PidResolverConfig(negative_ttl_s=5.0), proc=str(tmp_path), metrics=SelfMetrics(), clock=lambda: now[0]
    )
    # Just forked: still in the runtime's cgroup, not yet the container's.
    _write_proc(tmp_path, 50, "0::/system.slice/containerd.service\n", start=77)
    assert resolver.resolve(50) is None
    (tmp_path / "50" / "cgroup").write_text(f"0::/kubepods/besteffort/pod{UID}/{CID_C}\n")
    now[0] += 1.0
    assert resolver.resolve(50) is None  # the negative answer is still trusted
    now[0] += 5.0
    ref = resolver.resolve(50)
    assert ref == ContainerRef(CID_C, "unknown", UID, "besteffort")
    # A positive answer is cached: rewriting the file does not change it for this process.
    (tmp_path / "50" / "cgroup").write_text("0::/\n")
    assert resolver.resolve(50) == ref


def test_the_resolvers_last_answer_holds_no_longer_than_the_cache_would(tmp_path: Path) -> None:
    # The answer given last is given again without the lock, but only while the cache would
    # give it: a negative answer until its own time, a process's until its start is read again.
    now = [0.0]
    resolver = PidResolver(PidResolverConfig(negative_ttl_s=0.5, start_recheck_s=10.0), proc=str(tmp_path),
                           metrics=SelfMetrics(), clock=lambda: now[0])
    _write_proc(tmp_path, 60, "0::/system.slice/containerd.service\n", start=11)
    _write_proc(tmp_path, 61, f"0::/kubepods/pod{UID}/{CID_A}\n", start=12)
    assert resolver.resolve(60) is None
    now[0] = 0.1
    assert resolver.resolve(60) is None  # from the cache, and remembered
    (tmp_path / "60" / "cgroup").write_text(f"0::/kubepods/besteffort/pod{UID}/{CID_C}\n")
    now[0] = 0.4
    assert resolver.resolve(60) is None  # the negative answer still holds
    now[0] = 0.6
    assert resolver.resolve(60) == ContainerRef(CID_C, "unknown", UID, "besteffort")  # its time is over
    # another process in between: each is answered as itself
    for t in (0.7, 0.8, 0.9):
        now[0] = t
        ref = resolver.resolve(61)
        assert ref is not None and ref.container_id == CID_A
        assert resolver.resolve(60) == ContainerRef(CID_C, "unknown", UID, "besteffort")
    # the same PID, a new process in another container: seen once the start time is read again
    _write_proc(tmp_path, 60, f"0::/kubepods/pod{UID}/{CID_A}\n", start=99)
    now[0] = 9.9
    assert resolver.resolve(60) == ContainerRef(CID_C, "unknown", UID, "besteffort")
    now[0] = 10.7
    ref = resolver.resolve(60)
    assert ref is not None and ref.container_id == CID_A


# --- real cgroups -------------------------------------------------------------------------------

UNIFIED = Path("/sys/fs/cgroup/unified")
V1_PIDS = Path("/sys/fs/cgroup/pids")


def _writable_hierarchy(root: Path, fstype: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return "no /proc/self/mounts"
    if not any(line.split()[1] == str(root) and line.split()[2] == fstype for line in mounts.splitlines()):
        return f"no {fstype} mounted at {root}"
    return None


def _own_cgroup_path(hierarchy: str) -> str:
    """This process's path in one hierarchy (``""`` = v2, else a v1 controller name)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == hierarchy or (hierarchy and hierarchy in controllers.split(",")):
            return path
    raise AssertionError(f"hierarchy {hierarchy!r} not in /proc/self/cgroup")


class _CgroupTree:
    """Creates cgroup directories and moves processes into them; undoes both."""

    def __init__(self, mount: Path, hierarchy: str) -> None:
        self.mount = mount
        self.home = mount / _own_cgroup_path(hierarchy).lstrip("/")
        self.created: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def place_sleeper(self, rel_path: str) -> int:
        target = self.mount / rel_path
        for parent in reversed([target, *target.parents]):
            if parent == self.mount or self.mount not in parent.parents:
                continue
            if not parent.exists():
                parent.mkdir()
                self.created.append(parent)
        proc = subprocess.Popen(["sleep", "60"])
        self.procs.append(proc)
        (target / "cgroup.procs").write_text(f"{proc.pid}\n")
        return proc.pid

    def cleanup(self) -> None:
        for proc in self.procs:
            try:
                (self.home / "cgroup.procs").write_text(f"{proc.pid}\n")
            except OSError:
                pass  # already gone; killing it below empties the cgroup anyway
            proc.kill()
            proc.wait(timeout=10)
        for d in reversed(self.created):
            d.rmdir()


@pytest.fixture
def unified() -> Iterator[_CgroupTree]:
    reason = _writable_hierarchy(UNIFIED, "cgroup2")
    if reason:
        pytest.skip(reason)
    tree = _CgroupTree(UNIFIED, "")
    try:
        yield tree
    finally:
        tree.cleanup()


@pytest.fixture
def v1_pids() -> Iterator[_CgroupTree]:
    reason = _writable_hierarchy(V1_PIDS, "cgroup")
    if reason:
        pytest.skip(reason)
    tree = _CgroupTree(V1_PIDS, "pids")
    try:
        yield tree
    finally:
        tree.cleanup()


def _unique_root() -> str:
    return f"infersight-test-{secrets.token_hex(4)}.slice"


def test_real_v2_systemd_driver_containerd(unified: _CgroupTree) -> None:
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    root = _unique_root()
    pid = unified.place_sleeper(
        f"{root}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
        f"cri-containerd-{cid}.scope"
    )
    assert container_of(pid) == ContainerRef(cid, "containerd", uid, "burstable")
    assert PidResolver(metrics=SelfMetrics()).resolve(pid) == ContainerRef(cid, "containerd", uid, "burstable")


def test_real_v2_systemd_driver_crio_and_its_conmon(unified: _CgroupTree) -> None:
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    pod = f"{_unique_root()}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    workload = unified.place_sleeper(f"{pod}/crio-{cid}.scope")
    conmon = unified.place_sleeper(f"{pod}/crio-conmon-{cid}.scope")
    assert container_of(workload) == ContainerRef(cid, "cri-o", uid, "besteffort")
    assert container_of(conmon) is None


def test_real_v2_cgroupfs_driver_guaranteed_and_burstable(unified: _CgroupTree) -> None:
    root = _unique_root()
    g_uid, b_uid = str(uuid.uuid4()), str(uuid.uuid4())
    g_cid, b_cid = secrets.token_hex(32), secrets.token_hex(32)
    g_pid = unified.place_sleeper(f"{root}/kubepods/pod{g_uid}/{g_cid}")
    b_pid = unified.place_sleeper(f"{root}/kubepods/burstable/pod{b_uid}/{b_cid}")
    assert container_of(g_pid) == ContainerRef(g_cid, "unknown", g_uid, "guaranteed")
    assert container_of(b_pid) == ContainerRef(b_cid, "unknown", b_uid, "burstable")


def test_real_process_outside_a_container_is_none(unified: _CgroupTree) -> None:
    pid = unified.place_sleeper(f"{_unique_root()}/system.slice/containerd.service")
    assert container_of(pid) is None
    assert container_of(os.getpid()) is None


def test_real_v1_cgroupfs_driver(v1_pids: _CgroupTree) -> None:
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    pid = v1_pids.place_sleeper(f"{_unique_root()}/kubepods/besteffort/pod{uid}/{cid}")
    text = Path(f"/proc/{pid}/cgroup").read_text()
    assert ":pids:/infersight-test-" in text  # the file really is multi-line v1
    assert container_of(pid) == ContainerRef(cid, "unknown", uid, "besteffort")
