"""The join against real collectors: the real PodIndex on a fake API server, the real
NvmlCollector on the fake libnvidia-ml.so.1, the real GpuPodMap on a fake kubelet socket,
the real PidResolver on a /proc tree written the way the kernel writes it.

NVML runs on a manual clock (``period_s`` an hour, samples taken with ``sample_now``), so
every window holds exactly the samples a test put there.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.join import (
    A_CUDA_GRAPH_LAUNCHES,
    A_CUDA_LAUNCHES,
    A_CUDA_MEMCPY,
    A_CUDA_SYNC,
    A_ENERGY,
    A_GPU_SOURCE,
    A_POD_MEMORY_PEAK,
    A_POD_SM_SHARE,
    A_UTIL_MEAN,
    A_UUIDS,
    CUDA_TARGETS,
    DCGM_WINDOW_ATTRIBUTES,
    DERIVED_METRICS,
    FAILURES,
    GPU_MISSING,
    K8S_MISSING,
    PODS_DROPPED,
    Join,
    JoinConfig,
)
from agent.record import ActiveRequest, Request
from agent.selfmetrics import SelfMetrics
from collectors.cgroup import PidResolver
from collectors.k8s import UP, UP_LABELS, K8sConfig, PodIndex, StaticPodIndex
from collectors.kubelet import GpuPodMap, KubeletConfig, StaticGpuPodMap
from collectors.nvml import MetricPoint, NvmlCollector, NvmlConfig
from probes.cuda import CudaBucket, CudaWindow, summarise
from tests.fake_nvml import SCENARIO_ENV, FakeNvmlUnavailable, Scenario, build
from tests.fakes.fake_apiserver import FakeApiServer, make_pod, make_replicaset
from tests.fakes.fake_kubelet import FakeKubelet, pod_resources
from tests.join_support import (
    GPU0,
    MIG_B,
    NODE,
    NVML_BASE,
    ManualClock,
    S,
    new_cid,
    new_uid,
    serve_text,
    systemd_path,
    wait_for,
    write_proc,
)

T0 = 1_700_000_000 * S
W0 = T0 + S  # the windows of tests that take two samples of their own


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    try:
        return str(build(tmp_path_factory.mktemp("fake_nvml_join")))
    except FakeNvmlUnavailable as e:
        pytest.skip(f"fake NVML cannot be built: {e}")


@pytest.fixture
def scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scenario:
    sc = Scenario(tmp_path / "scenario.txt")
    sc.set(NVML_BASE)
    monkeypatch.setenv(SCENARIO_ENV, str(sc.path))
    return sc


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def metrics() -> SelfMetrics:
    return SelfMetrics()


@pytest.fixture
def nvml(fake_lib: str, scenario: Scenario, clock: ManualClock, metrics: SelfMetrics) -> Iterator[NvmlCollector]:
    c = NvmlCollector(NvmlConfig(period_s=3600, event_timeout_ms=50), metrics=metrics, clock=clock.ns,
                      library_path=fake_lib)
    c.start()
    yield c
    c.stop()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    yield server
    server.stop()


@dataclass
class Pod:
    name: str
    uid: str
    containers: dict[str, str]  # name -> container id

    def info_path(self, container: str) -> str:
        return systemd_path(self.uid, self.containers[container])


def add_deployment_pod(api: FakeApiServer, name: str, deployment: str, containers: list[str]) -> Pod:
    pod = Pod(name, new_uid(), {c: new_cid() for c in containers})
    rs = f"{deployment}-5d4f8b7c9"
    api.put_replicaset(make_replicaset(rs, deployment=deployment, template_hash="5d4f8b7c9"))
    api.put_pod(make_pod(name, node=NODE, uid=pod.uid, containers=dict(pod.containers),
                         owner=("apps/v1", "ReplicaSet", rs), labels={"pod-template-hash": "5d4f8b7c9"}))
    return pod


@pytest.fixture
def index(api: FakeApiServer, metrics: SelfMetrics) -> Iterator[PodIndex]:
    idx = PodIndex(K8sConfig(node_name=NODE, api_url=api.url, backoff_initial_s=0.05, backoff_max_s=0.2),
                   metrics=metrics)
    yield idx
    idx.stop()


def make_join(proc: Path, metrics: SelfMetrics, clock: ManualClock, **kw: Any) -> Join:
    cfg_keys = {k: kw.pop(k) for k in list(kw) if k in JoinConfig.__dataclass_fields__}
    cfg = JoinConfig(node_name=NODE, proc=str(proc), **{"cuda_enabled": False, "dcgm_enabled": False, **cfg_keys})
    return Join(cfg, resolver=PidResolver(proc=str(proc), metrics=metrics), metrics=metrics,
                clock=clock.s, wall_clock=clock.ns, **kw)


def record(pid: int, t0: int, t1: int, tokens: int | None = None) -> Request:
    return Request(start_time_unix_nano=t0, end_time_unix_nano=t1, pid=pid, command="python3", method="POST",
                   path="/v1/chat/completions", status_code=200, output_tokens=tokens)


def points_named(points: list[MetricPoint], name: str, **attrs: str) -> list[MetricPoint]:
    return [p for p in points if p.name == name
            and all(p.attributes.get(k.replace("__", ".").replace("_", ".")) == v for k, v in attrs.items())]


def one_value(points: list[MetricPoint], name: str, pod: str, uuid: str | None = None) -> float:
    found = [p for p in points if p.name == name and p.attributes.get("k8s.pod.name") == pod
             and (uuid is None or p.attributes.get("gpu.uuid") == uuid)]
    assert len(found) == 1, (name, pod, found)
    return found[0].value


def no_socket(tmp_path: Path, metrics: SelfMetrics) -> GpuPodMap:
    """The real kubelet map where the node has no pod-resources socket."""
    m = GpuPodMap(KubeletConfig(socket_path=str(tmp_path / "absent.sock")), metrics=metrics)
    m.poll_once()
    return m


# ---- k8s ------------------------------------------------------------------------------------


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        JoinConfig(refresh_s=0)
    with pytest.raises(ValueError):
        JoinConfig(max_pods=0)


def test_node_name_comes_from_the_downward_api_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "gpu-node-7")
    assert JoinConfig().node_name == "gpu-node-7"
    assert JoinConfig().k8s_config().node_name == "gpu-node-7"


def test_record_carries_pod_container_and_deployment_from_the_api_server(
        api: FakeApiServer, index: PodIndex, proc: Path, metrics: SelfMetrics, clock: ManualClock) -> None:
    pod = add_deployment_pod(api, "llm-7d9c-abcde", "llm", ["server", "sidecar"])
    sts_uid, sts_cid = new_uid(), new_cid()
    api.put_pod(make_pod("db-0", node=NODE, uid=sts_uid, containers={"db": sts_cid},
                         owner=("apps/v1", "StatefulSet", "db")))
    write_proc(proc, 1001, pod.info_path("server"))
    write_proc(proc, 1002, systemd_path(sts_uid, sts_cid))
    write_proc(proc, 1003, "/system.slice/sshd.service")
    index.start()
    wait_for(lambda: index.synced and index.by_uid(sts_uid), what="pod index")
    join = make_join(proc, metrics, clock, pods=index, gpu_enabled=False)

    out = join(record(1001, T0, T0 + S))
    assert {k: v for k, v in out.attributes.items() if k.startswith("k8s.")} == {
        "k8s.node.name": NODE,
        "k8s.namespace.name": "default",
        "k8s.pod.name": "llm-7d9c-abcde",
        "k8s.pod.uid": pod.uid,
        "k8s.container.name": "server",
        "k8s.deployment.name": "llm",
    }
    sts = join(record(1002, T0, T0 + S)).attributes
    assert sts["k8s.statefulset.name"] == "db" and sts["k8s.pod.name"] == "db-0"
    assert "k8s.deployment.name" not in sts
    host = join(record(1003, T0, T0 + S)).attributes
    assert dict(host) == {"k8s.node.name": NODE}
    assert metrics.get(K8S_MISSING, (("reason", "not_in_container"),)) == 1
    # the record itself is otherwise untouched
    assert out.pid == 1001 and out.status_code == 200 and out.start_time_unix_nano == T0


def test_in_flight_requests_get_the_pod_attributes(proc: Path, metrics: SelfMetrics, clock: ManualClock) -> None:
    from collectors.k8s import PodInfo

    uid, cid = new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, cid))
    pods = StaticPodIndex([PodInfo("prod", "llm-1", uid, NODE, {cid: "server"}, "Deployment", "llm")])
    join = make_join(proc, metrics, clock, pods=pods, gpu_enabled=False)
    active = ActiveRequest(T0, 1001, "python3", 8000, "POST", "/v1/chat/completions", "m")
    decorated = join.decorate_active([active])[0]
    assert decorated.attributes["k8s.deployment.name"] == "llm"
    assert decorated.attributes["k8s.namespace.name"] == "prod"
    assert decorated.start_time_unix_nano == T0 and decorated.path == active.path
    # a process outside any pod is left as it was, apart from the node
    write_proc(proc, 1009, "/user.slice")
    other = join.active_decorator(ActiveRequest(T0, 1009, "x", None, None, None, None))
    assert dict(other.attributes) == {"k8s.node.name": NODE}


def test_unreachable_api_server_costs_the_pod_attributes_only(
        tmp_path: Path, proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector,
        scenario: Scenario) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    idx = PodIndex(K8sConfig(node_name=NODE, api_url=dead, backoff_initial_s=0.05, backoff_max_s=0.1),
                   metrics=metrics)
    idx.start()
    try:
        wait_for(lambda: metrics.get("infersight.k8s.api.errors", (("reason", "unreachable"),)) >= 1)
        uid, cid = new_uid(), new_cid()
        write_proc(proc, 1001, systemd_path(uid, cid))
        scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 4_000_000_000})
        nvml.sample_now()
        join = make_join(proc, metrics, clock, pods=idx, gpu_map=no_socket(tmp_path, metrics), nvml=nvml)
        out = join(record(1001, T0 - S, T0)).attributes
    finally:
        idx.stop()
    assert "k8s.pod.name" not in out and out["k8s.node.name"] == NODE
    assert metrics.get(K8S_MISSING, (("reason", "pod_unknown"),)) == 1
    assert metrics.get(UP, UP_LABELS) == 0
    assert out[A_UUIDS] == (GPU0,) and out[A_GPU_SOURCE] == "nvml"
    assert out[A_POD_MEMORY_PEAK] == 4_000_000_000


def test_a_failing_source_passes_the_record_on_unchanged_and_counts(
        proc: Path, metrics: SelfMetrics, clock: ManualClock) -> None:
    class BrokenIndex(StaticPodIndex):
        def by_container(self, container_id: str) -> Any:
            raise RuntimeError("index corrupted")

    write_proc(proc, 1001, systemd_path(new_uid(), new_cid()))
    join = make_join(proc, metrics, clock, pods=BrokenIndex(), gpu_enabled=False)
    rec = record(1001, T0, T0 + S)
    assert join(rec) is rec
    assert join(rec) is rec
    assert metrics.get(FAILURES, (("stage", "record"),)) == 2


# ---- gpu window -----------------------------------------------------------------------------


def two_samples(nvml: NvmlCollector, scenario: Scenario, clock: ManualClock, first: dict[str, object],
                second: dict[str, object]) -> None:
    """One NVML sample at W0 with ``first``, one at W0 + 1 s with ``second`` (the collector took
    its first sample at T0, when it started, before the window)."""
    scenario.update(first)
    clock.t = W0
    nvml.sample_now()
    scenario.update(second)
    clock.t = W0 + S
    nvml.sample_now()


def test_gpu_window_for_a_pod_holding_a_whole_gpu(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    uid, api_cid, engine_cid = new_uid(), new_cid(), new_cid()
    # the API server process serves HTTP, a second process of the pod runs the GPU (as in vLLM)
    write_proc(proc, 1001, systemd_path(uid, api_cid))
    write_proc(proc, 1002, systemd_path(uid, engine_cid))
    pods = StaticPodIndex([PodInfo("default", "llm-1", uid, NODE, {api_cid: "api", engine_cid: "engine"},
                                   "Deployment", "llm")])
    kubelet = StaticGpuPodMap({GPU0: [("default", "llm-1", "engine")]})
    two_samples(nvml, scenario, clock,
                {"gpu0.util_gpu": 60, "gpu0.procs": 1, "gpu0.proc0.pid": 1002, "gpu0.proc0.mem": 8_000_000_000,
                 "gpu0.proc0.sm": 50, "gpu0.proc0.ts_us": W0 // 1000},
                {"gpu0.util_gpu": 80, "gpu0.proc0.mem": 10_000_000_000, "gpu0.proc0.sm": 70,
                 "gpu0.proc0.ts_us": (W0 + S) // 1000})
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=kubelet, nvml=nvml)
    join.refresh()  # learns that pid 1002 belongs to the pod
    out = join(record(1001, W0, W0 + S)).attributes
    assert out[A_UUIDS] == (GPU0,)
    assert out[A_GPU_SOURCE] == "kubelet"
    assert out[A_UTIL_MEAN] == pytest.approx(0.7)
    assert out[A_POD_MEMORY_PEAK] == 10_000_000_000
    assert out[A_POD_SM_SHARE] == 1.0  # the pod holds the GPU alone
    assert out[A_ENERGY] == pytest.approx(300.0)  # 300 W for 1 s, all of it the pod's
    assert out["k8s.deployment.name"] == "llm"
    # a window with no sample inside uses the state when it opened, within three periods
    late = join(record(1001, W0 + S + S // 2, W0 + S + S // 2 + 1000)).attributes
    assert late[A_UTIL_MEAN] == pytest.approx(0.8)
    # device metrics carry the pod that holds the device, as dcgm-exporter's do
    device = [p for p in join.decorate_points(nvml.points()) if p.attributes.get("gpu.uuid") == GPU0]
    assert device and all(p.attributes["k8s.pod.name"] == "llm-1" for p in device)
    assert all(p.attributes["k8s.namespace.name"] == "default" for p in device)


def test_time_sliced_gpu_is_shared_by_sm_utilisation(
        tmp_path: Path, proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector,
        scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    a_uid, a_cid, b_uid, b_cid = new_uid(), new_cid(), new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(a_uid, a_cid))
    write_proc(proc, 2001, systemd_path(b_uid, b_cid))
    pods = StaticPodIndex([PodInfo("default", "llm-a", a_uid, NODE, {a_cid: "server"}, "Deployment", "llm-a"),
                           PodInfo("default", "llm-b", b_uid, NODE, {b_cid: "server"}, "Deployment", "llm-b")])
    # the real kubelet map, from a fake kubelet advertising time-slicing replicas GPU0::0 and GPU0::1
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock"))
    kubelet.pods = [
        pod_resources("default", "llm-a", {"server": {"nvidia.com/gpu": [f"{GPU0}::0"]}}),
        pod_resources("default", "llm-b", {"server": {"nvidia.com/gpu": [f"{GPU0}::1"]}}),
    ]
    kubelet.start()
    gpu_map = GpuPodMap(KubeletConfig(socket_path=kubelet.socket_path), metrics=metrics)
    try:
        assert gpu_map.poll_once()
        procs = {"gpu0.procs": 2, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 6_000_000_000,
                 "gpu0.proc1.pid": 2001, "gpu0.proc1.mem": 2_000_000_000}
        two_samples(nvml, scenario, clock,
                    {**procs, "gpu0.util_gpu": 50, "gpu0.proc0.sm": 30, "gpu0.proc0.ts_us": W0 // 1000,
                     "gpu0.proc1.sm": 20, "gpu0.proc1.ts_us": W0 // 1000},
                    {"gpu0.proc0.ts_us": (W0 + S) // 1000, "gpu0.proc1.ts_us": (W0 + S) // 1000})
        join = make_join(proc, metrics, clock, pods=pods, gpu_map=gpu_map, nvml=nvml)
        join.refresh()
        a = join(record(1001, W0, W0 + S)).attributes
        b = join(record(2001, W0, W0 + S)).attributes
        assert a[A_UUIDS] == b[A_UUIDS] == (GPU0,)
        assert a[A_POD_SM_SHARE] == pytest.approx(0.6)
        assert b[A_POD_SM_SHARE] == pytest.approx(0.4)
        assert a[A_ENERGY] == pytest.approx(300.0 * 0.6)
        assert a[A_POD_MEMORY_PEAK] == 6_000_000_000 and b[A_POD_MEMORY_PEAK] == 2_000_000_000
        join.refresh()
        pts = join.points()
        assert one_value(pts, "infersight.pod.gpu.utilization.share", "llm-a", GPU0) == pytest.approx(0.6)
        assert one_value(pts, "infersight.pod.gpu.utilization.share", "llm-b", GPU0) == pytest.approx(0.4)
        assert one_value(pts, "infersight.pod.gpu.memory.usage", "llm-b", GPU0) == 2_000_000_000
        # a GPU two pods share keeps device attributes only: the shares above are per pod
        device = [p for p in join.decorate_points(nvml.points()) if p.attributes.get("gpu.uuid") == GPU0]
        assert device and not any("k8s.pod.name" in p.attributes for p in device)
    finally:
        gpu_map.stop()
        kubelet.stop()


def test_shared_gpu_without_per_process_utilisation_reports_no_share(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    """Two pods on one GPU and no SM samples: the share is unknown, and not invented."""
    from collectors.k8s import PodInfo

    a_uid, a_cid, b_uid, b_cid = new_uid(), new_cid(), new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(a_uid, a_cid))
    write_proc(proc, 2001, systemd_path(b_uid, b_cid))
    pods = StaticPodIndex([PodInfo("default", "a", a_uid, NODE, {a_cid: "s"}),
                           PodInfo("default", "b", b_uid, NODE, {b_cid: "s"})])
    scenario.update({"gpu0.procs": 2, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 1,
                     "gpu0.proc1.pid": 2001, "gpu0.proc1.mem": 1, "gpu0.proc_util": 0})
    nvml.sample_now()
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=StaticGpuPodMap(available=False), nvml=nvml)
    join.refresh()
    out = join(record(1001, T0 - S, T0)).attributes
    assert out[A_UUIDS] == (GPU0,) and out[A_GPU_SOURCE] == "nvml"
    assert A_POD_SM_SHARE not in out and A_ENERGY not in out
    assert out[A_UTIL_MEAN] == pytest.approx(0.6)


def test_mig_device_without_kubelet_comes_from_nvml_placement(
        tmp_path: Path, proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector,
        scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    uid, cid = new_uid(), new_cid()
    write_proc(proc, 3001, systemd_path(uid, cid))
    pods = StaticPodIndex([PodInfo("ml", "mig-pod", uid, NODE, {cid: "server"}, "StatefulSet", "mig")])
    scenario.update({"gpu1.procs": 1, "gpu1.proc0.pid": 3001, "gpu1.proc0.mem": 3_000_000_000,
                     "gpu1.proc0.gi": 2, "gpu1.proc0.ci": 0})
    nvml.sample_now()
    kubelet = no_socket(tmp_path, metrics)
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=kubelet, nvml=nvml)
    join.refresh()
    out = join(record(3001, T0 - S, T0)).attributes
    assert out[A_UUIDS] == (MIG_B,) and out[A_GPU_SOURCE] == "nvml"
    assert out[A_POD_SM_SHARE] == 1.0  # a MIG device is its pod's alone
    assert out[A_POD_MEMORY_PEAK] == 3_000_000_000
    assert A_UTIL_MEAN not in out  # NVML has no utilisation for MIG devices
    assert metrics.get("infersight.collector.up", (("source", "kubelet"),)) == 0
    # energy: the MIG device gets its parent's in proportion to its memory (10 of 40 GB)
    scenario.update({"gpu1.energy_mj": 500_000_000 + 1_000_000})
    clock.advance(1)
    nvml.sample_now()
    join.refresh()
    pts = join.points()
    assert one_value(pts, "infersight.pod.gpu.energy", "mig-pod") == pytest.approx(250.0)
    assert one_value(pts, "infersight.pod.gpu.time", "mig-pod") == pytest.approx(1.0)
    assert one_value(pts, "infersight.pod.gpu.memory.usage", "mig-pod", MIG_B) == 3_000_000_000


def test_no_nvml_means_no_gpu_attributes_and_is_counted(
        fake_lib: str, proc: Path, metrics: SelfMetrics, clock: ManualClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCENARIO_ENV, raising=False)  # the fake acts as a node without a driver
    nvml = NvmlCollector(NvmlConfig(period_s=3600, event_timeout_ms=50), metrics=metrics, library_path=fake_lib)
    nvml.start()
    try:
        write_proc(proc, 1001, systemd_path(new_uid(), new_cid()))
        join = make_join(proc, metrics, clock, pods=StaticPodIndex(), gpu_map=StaticGpuPodMap(available=False),
                         nvml=nvml)
        join.refresh()
        out = join(record(1001, T0, T0 + S)).attributes
    finally:
        nvml.stop()
    assert not [k for k in out if k.startswith("gpu.")]
    assert metrics.get(GPU_MISSING, (("reason", "nvml_unavailable"),)) == 1
    assert metrics.get("infersight.collector.up", (("source", "nvml"),)) == 0
    assert join.points() == []


# ---- per-pod accounting ---------------------------------------------------------------------


def test_gpu_seconds_and_energy_per_output_token(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    uid, cid = new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, cid))
    pods = StaticPodIndex([PodInfo("default", "llm-1", uid, NODE, {cid: "server"}, "Deployment", "llm")])
    scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 5_000_000_000})
    nvml.sample_now()
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=StaticGpuPodMap({GPU0: [("default", "llm-1", "s")]}),
                     nvml=nvml, ratio_window_s=60)
    join.refresh()  # the first tick only sets the baseline
    # two requests (concurrent: they overlap in time) with 100 and 50 output tokens
    join(record(1001, T0, T0 + 8 * S, tokens=100))
    join(record(1001, T0 + 2 * S, T0 + 9 * S, tokens=50))
    clock.advance(10)
    scenario.update({"gpu0.energy_mj": 1_000_000_000 + 3_000_000})  # 3000 J in those 10 s
    nvml.sample_now()
    join.refresh()
    pts = join.points()
    attrs = points_named(pts, "infersight.pod.gpu.time")[0].attributes
    assert attrs == {"k8s.namespace.name": "default", "k8s.pod.name": "llm-1", "k8s.pod.uid": uid,
                     "k8s.node.name": NODE, "k8s.deployment.name": "llm"}
    # 10 s of one whole GPU, whatever the number of requests served in them
    assert one_value(pts, "infersight.pod.gpu.time", "llm-1") == pytest.approx(10.0)
    assert one_value(pts, "infersight.pod.gpu.energy", "llm-1") == pytest.approx(3000.0)
    assert one_value(pts, "infersight.pod.output_tokens", "llm-1") == 150
    assert one_value(pts, "infersight.pod.gpu.time_per_output_token", "llm-1") == pytest.approx(10 / 150)
    assert one_value(pts, "infersight.pod.gpu.energy_per_output_token", "llm-1") == pytest.approx(20.0)
    assert one_value(pts, "infersight.pod.gpu.memory.usage", "llm-1", GPU0) == 5_000_000_000
    for p in pts:
        assert "process.pid" not in p.attributes
        assert p.prom_name in {d.prom_name for d in DERIVED_METRICS}
    # past the ratio window with no tokens, the per-token gauges go; the counters stay
    clock.advance(61)
    nvml.sample_now()
    join.refresh()
    clock.advance(1)
    nvml.sample_now()
    join.refresh()
    pts = join.points()
    assert not points_named(pts, "infersight.pod.gpu.time_per_output_token")
    assert one_value(pts, "infersight.pod.gpu.time", "llm-1") == pytest.approx(72.0)


def test_pod_accounts_are_bounded_and_the_excess_counted(
        proc: Path, metrics: SelfMetrics, clock: ManualClock) -> None:
    from collectors.k8s import PodInfo

    infos = []
    for i in range(3):
        uid, cid = new_uid(), new_cid()
        write_proc(proc, 1000 + i, systemd_path(uid, cid))
        infos.append(PodInfo("default", f"p{i}", uid, NODE, {cid: "s"}))
    join = make_join(proc, metrics, clock, pods=StaticPodIndex(infos), gpu_enabled=False, max_pods=2)
    for i in range(3):
        join(record(1000 + i, T0, T0 + S, tokens=5))
    pts = join.points()
    assert {p.attributes["k8s.pod.name"] for p in pts} == {"p0", "p1"}
    assert metrics.get(PODS_DROPPED) == 1
    # pods that never held a GPU have tokens, and no GPU time or energy that would claim a zero
    assert {p.name for p in pts} == {"infersight.pod.output_tokens"}


# ---- CUDA -----------------------------------------------------------------------------------


class RecordedCuda:
    """Completed CUDA buckets per process, summed by the probe's own ``summarise``: what
    ``CudaProbe`` holds after its thread has read the kernel map (the probe itself needs root and
    BPF; tests/test_join_e2e.py runs it for real)."""

    def __init__(self, bucket_ns: int) -> None:
        self.bucket_ns = bucket_ns
        self.buckets: dict[int, list[CudaBucket]] = {}
        self.added: list[int] = []

    def put(self, pid: int, start: int, launches: int, htod: int = 0, sync_ns: int = 0) -> None:
        self.buckets.setdefault(pid, []).append(CudaBucket(pid, start, launches, 1, 0, 0, htod, 0, 0, 1, sync_ns,
                                                           (0,) * 32))

    def window(self, pid: int, t0_ns: int, t1_ns: int) -> CudaWindow | None:
        return summarise(pid, [b for b in self.buckets.get(pid, ())
                               if b.start_unix_nano <= t1_ns and b.start_unix_nano + self.bucket_ns > t0_ns],
                         self.bucket_ns)

    def add_pid(self, pid: int) -> None:
        self.added.append(pid)

    def pids(self) -> list[int]:
        return sorted(set(self.added))


def test_cuda_window_sums_the_pods_processes_and_they_are_traced(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    uid, api_cid, engine_cid = new_uid(), new_cid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, api_cid))
    write_proc(proc, 1002, systemd_path(uid, engine_cid))
    write_proc(proc, 4001, systemd_path(new_uid(), new_cid()))  # another pod's GPU process
    pods = StaticPodIndex([PodInfo("default", "llm-1", uid, NODE, {api_cid: "api", engine_cid: "engine"})])
    scenario.update({"gpu0.procs": 2, "gpu0.proc0.pid": 1002, "gpu0.proc0.mem": 1,
                     "gpu0.proc1.pid": 4001, "gpu0.proc1.mem": 1})
    nvml.sample_now()
    cuda = RecordedCuda(bucket_ns=100_000_000)
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=StaticGpuPodMap({GPU0: [("default", "llm-1", "e")]}),
                     nvml=nvml, cuda=cuda, cuda_enabled=True)
    join(record(1001, T0, T0 + S))  # the serving process is remembered...
    join.refresh()  # ...and with the pod's GPU process handed to the CUDA probe; the other pod's too
    assert sorted(cuda.added) == [1001, 1002, 4001]
    assert metrics.get(CUDA_TARGETS) == 3
    join.refresh()  # a process already traced is not handed again
    assert sorted(cuda.added) == [1001, 1002, 4001]
    t = T0 + 10 * S
    cuda.put(1002, t, launches=40, htod=1 << 20, sync_ns=2_000_000)
    cuda.put(1002, t + 100_000_000, launches=2)
    cuda.put(1002, t + 500_000_000, launches=1000)  # after the window
    cuda.put(1001, t, launches=1)
    cuda.put(4001, t, launches=7777)  # not this pod
    out = join(record(1001, t + 10_000_000, t + 150_000_000)).attributes
    assert out[A_CUDA_LAUNCHES] == 43
    assert out[A_CUDA_GRAPH_LAUNCHES] == 3
    assert out[A_CUDA_MEMCPY] == 1 << 20
    assert out[A_CUDA_SYNC] == pytest.approx(0.002)
    assert out["gpu.window.cuda.span.seconds"] == pytest.approx(0.2)
    # no buckets over a window: no CUDA attributes, rather than zeros that claim a measurement
    quiet = join(record(1001, t + 2 * S, t + 3 * S)).attributes
    assert A_CUDA_LAUNCHES not in quiet and quiet[A_UUIDS] == (GPU0,)


def test_pipeline_stage_name_labels_stage_errors(proc: Path, metrics: SelfMetrics, clock: ManualClock) -> None:
    join = make_join(proc, metrics, clock, pods=StaticPodIndex(), gpu_enabled=False)
    assert join.__name__ == "join"


@pytest.fixture
def started_join(proc: Path, metrics: SelfMetrics, clock: ManualClock) -> Iterator[Callable[..., Join]]:
    made: list[Join] = []

    def make(**kw: Any) -> Join:
        j = make_join(proc, metrics, clock, **kw)
        made.append(j)
        j.start()
        return j

    yield make
    for j in made:
        j.stop()


def test_refresh_thread_learns_new_gpu_processes(
        started_join: Callable[..., Join], proc: Path, nvml: NvmlCollector, scenario: Scenario) -> None:
    from collectors.k8s import PodInfo

    uid, api_cid, engine_cid = new_uid(), new_cid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, api_cid))
    write_proc(proc, 1002, systemd_path(uid, engine_cid))
    pods = StaticPodIndex([PodInfo("default", "llm-1", uid, NODE, {api_cid: "api", engine_cid: "engine"})])
    join = started_join(pods=pods, gpu_map=StaticGpuPodMap(available=False), nvml=nvml, refresh_s=0.02)
    assert A_UUIDS not in join(record(1001, T0 - S, T0)).attributes
    scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 1002, "gpu0.proc0.mem": 1})
    nvml.sample_now()
    wait_for(lambda: A_UUIDS in join(record(1001, T0 - S, T0)).attributes, what="the engine process's GPU")


def test_docs_name_every_attribute_and_metric() -> None:
    import agent.join as join_module

    doc = (Path(__file__).resolve().parent.parent / "docs" / "join.md").read_text()
    attributes = [v for k, v in vars(join_module).items() if k.startswith("A_")]
    assert len(attributes) >= 10
    for name in attributes:
        assert f"`{name}`" in doc, name
    for d in DERIVED_METRICS:
        assert f"`{d.name}`" in doc and f"`{d.prom_name}`" in doc, d.name
    for attribute in DCGM_WINDOW_ATTRIBUTES.values():
        assert f"`{attribute}`" in doc, attribute
    for counter in (FAILURES, K8S_MISSING, GPU_MISSING, PODS_DROPPED, CUDA_TARGETS):
        assert counter in doc, counter


# ---- DCGM -----------------------------------------------------------------------------------

DCGM_TEXT = f"""\
# HELP DCGM_FI_PROF_SM_ACTIVE The ratio of cycles an SM has at least 1 warp assigned.
# TYPE DCGM_FI_PROF_SM_ACTIVE gauge
DCGM_FI_PROF_SM_ACTIVE{{gpu="0",UUID="{GPU0}",pci_bus_id="00000000:17:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="{NODE}"}} 0.8
# HELP DCGM_FI_PROF_PIPE_TENSOR_ACTIVE Ratio of cycles the tensor (HMMA) pipe is active.
# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{gpu="0",UUID="{GPU0}",pci_bus_id="00000000:17:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="{NODE}"}} 0.45
"""


def test_dcgm_profiling_means_over_the_window(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    from collectors.dcgm import DcgmCollector, DcgmConfig
    from collectors.k8s import PodInfo

    uid, cid = new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, cid))
    pods = StaticPodIndex([PodInfo("default", "llm-1", uid, NODE, {cid: "server"})])
    scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 1})
    nvml.sample_now()
    with serve_text(DCGM_TEXT) as url:
        dcgm = DcgmCollector(DcgmConfig(url=url, period_s=3600), devices=nvml.devices, metrics=metrics,
                             clock=clock.ns)
        assert dcgm.sample_now()
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=StaticGpuPodMap(available=False), nvml=nvml,
                     dcgm=dcgm, dcgm_enabled=True)
    join.refresh()
    out = join(record(1001, T0 - S, T0)).attributes
    assert out["gpu.window.sm.active.mean"] == pytest.approx(0.8)
    assert out["gpu.window.tensor.active.mean"] == pytest.approx(0.45)
    assert "gpu.window.dram.active.mean" not in out  # not in this exporter's field set


def test_a_gpu_the_kubelet_gave_another_pod_counts_as_shared(
        proc: Path, metrics: SelfMetrics, clock: ManualClock, nvml: NvmlCollector, scenario: Scenario) -> None:
    """A pod running on a GPU it did not request (NVIDIA_VISIBLE_DEVICES=all) is not its sole holder."""
    from collectors.k8s import PodInfo

    uid, cid = new_uid(), new_cid()
    write_proc(proc, 1001, systemd_path(uid, cid))
    pods = StaticPodIndex([PodInfo("default", "sneaky", uid, NODE, {cid: "s"})])
    scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 1, "gpu0.proc0.sm": 30,
                     "gpu0.proc0.ts_us": T0 // 1000})
    nvml.sample_now()
    kubelet = StaticGpuPodMap({GPU0: [("default", "owner", "s")]})
    join = make_join(proc, metrics, clock, pods=pods, gpu_map=kubelet, nvml=nvml)
    join.refresh()
    out = join(record(1001, T0, T0)).attributes
    assert out[A_UUIDS] == (GPU0,) and out[A_GPU_SOURCE] == "nvml"
    assert out[A_POD_SM_SHARE] == pytest.approx(0.5)  # 30 % SM of a GPU 60 % busy


def test_tensor_parallel_pods_sharing_two_gpus_are_shared_per_gpu(
        fake_lib: str, proc: Path, metrics: SelfMetrics, clock: ManualClock, scenario: Scenario) -> None:
    """Two pods, each with one process per GPU on the same two time-sliced GPUs: each pod's share
    is its SM use on each GPU over that GPU's, not its total SM over the mean utilisation."""
    from collectors.k8s import PodInfo
    from tests.join_support import GPU1

    a_uid, a_cid, b_uid, b_cid = new_uid(), new_cid(), new_uid(), new_cid()
    for pid in (1002, 1003):
        write_proc(proc, pid, systemd_path(a_uid, a_cid))
    for pid in (2002, 2003):
        write_proc(proc, pid, systemd_path(b_uid, b_cid))
    pods = StaticPodIndex([PodInfo("default", "tp-a", a_uid, NODE, {a_cid: "s"}),
                           PodInfo("default", "tp-b", b_uid, NODE, {b_cid: "s"})])
    ts = T0 // 1000
    scenario.update({"gpu1.mig": 0, "gpu1.migs": 0, "gpu1.proc_util": None, "gpu0.util_gpu": 40, "gpu1.util_gpu": 40,
                     "gpu0.procs": 2, "gpu0.proc0.pid": 1002, "gpu0.proc0.mem": 1, "gpu0.proc0.sm": 20,
                     "gpu0.proc0.ts_us": ts, "gpu0.proc1.pid": 2002, "gpu0.proc1.mem": 1, "gpu0.proc1.sm": 20,
                     "gpu0.proc1.ts_us": ts,
                     "gpu1.procs": 2, "gpu1.proc0.pid": 1003, "gpu1.proc0.mem": 1, "gpu1.proc0.sm": 20,
                     "gpu1.proc0.ts_us": ts, "gpu1.proc1.pid": 2003, "gpu1.proc1.mem": 1, "gpu1.proc1.sm": 20,
                     "gpu1.proc1.ts_us": ts})
    # a collector started on this node's layout (two whole GPUs, no MIG)
    nvml = NvmlCollector(NvmlConfig(period_s=3600, event_timeout_ms=50), metrics=metrics, clock=clock.ns,
                         library_path=fake_lib)
    nvml.start()
    try:
        join = make_join(proc, metrics, clock, pods=pods, gpu_map=StaticGpuPodMap(available=False), nvml=nvml)
        join.refresh()
        out = join(record(1002, T0, T0)).attributes
    finally:
        nvml.stop()
    assert out[A_UUIDS] == (GPU0, GPU1)
    assert out[A_POD_SM_SHARE] == pytest.approx(0.5)


def test_a_process_on_two_gpus_has_its_peak_on_each_added(
        fake_lib: str, proc: Path, metrics: SelfMetrics, clock: ManualClock, scenario: Scenario) -> None:
    """One process holding memory on two GPUs (llama.cpp and Ollama split a model's layers so):
    the pod's memory peak is the process's peak on each GPU, added, not its largest on one."""
    from tests.join_support import GPU1

    write_proc(proc, 1001, systemd_path(new_uid(), new_cid()))
    scenario.update({"gpu1.mig": 0, "gpu1.migs": 0, "gpu1.proc_util": None,
                     "gpu0.procs": 1, "gpu0.proc0.pid": 1001, "gpu0.proc0.mem": 6_000_000_000,
                     "gpu1.procs": 1, "gpu1.proc0.pid": 1001, "gpu1.proc0.mem": 3_000_000_000})
    nvml = NvmlCollector(NvmlConfig(period_s=3600, event_timeout_ms=50), metrics=metrics, clock=clock.ns,
                         library_path=fake_lib)
    nvml.start()  # its first sample, at T0
    try:
        scenario.update({"gpu0.proc0.mem": 7_000_000_000, "gpu1.proc0.mem": 2_000_000_000})
        clock.t = T0 + S
        nvml.sample_now()
        join = make_join(proc, metrics, clock, nvml=nvml)
        join.refresh()
        out = join(record(1001, T0, T0 + S)).attributes
        one = join(record(1001, T0 + S, T0 + S)).attributes  # the second sample alone
    finally:
        nvml.stop()
    assert out[A_UUIDS] == (GPU0, GPU1)
    assert out[A_POD_MEMORY_PEAK] == 7_000_000_000 + 3_000_000_000  # each GPU's own peak
    assert one[A_POD_MEMORY_PEAK] == 7_000_000_000 + 2_000_000_000
