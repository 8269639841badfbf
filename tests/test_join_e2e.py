"""The join end to end, with real eBPF: a real server in a kubelet-style cgroup, the real pipeline.

* The server (tests/join_server.py: the demo server plus CUDA calls on every POST
  through the stub ``libcudart.so.12``) runs in a cgroup v2 directory named as the
  kubelet's systemd driver and containerd name a container's;
* the fake API server serves its pod (container ID = the cgroup's), owned by a
  ReplicaSet of a Deployment, on this node;
* the fake NVML library reports the server's PID on a GPU with known utilisation
  and memory; no kubelet socket, so the GPU comes from NVML's process list;
* the real CUDA probe counts the server's launches with uprobes.

The real capture pipeline runs with the ``Join`` stage; records must carry the pod,
the deployment, the GPU, the window statistics and the exact launch counts. Then the
API server goes away: the agent keeps running and records keep their GPU attributes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
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
    FAILURES,
    Join,
    JoinConfig,
)
from agent.record import Request
from agent.selfmetrics import SelfMetrics
from agent.targets import TargetConfig
from collectors.cgroup import PidResolver
from collectors.k8s import UP, UP_LABELS, K8sConfig, PodIndex
from collectors.kubelet import GpuPodMap, KubeletConfig
from collectors.nvml import NvmlCollector, NvmlConfig
from probes.cuda import CudaProbe, CudaProbeConfig
from tests.cuda_stub.build import build as build_cuda_stubs
from tests.fake_nvml import SCENARIO_ENV, FakeNvmlUnavailable, Scenario
from tests.fake_nvml import build as build_fake_nvml
from tests.fakes.fake_apiserver import FakeApiServer, make_pod, make_replicaset
from tests.harness import REPO, Agent, free_port, running_agent
from tests.join_support import GPU0, NODE, new_cid, new_uid, systemd_path, wait_for

pytestmark = pytest.mark.ebpf

UNIFIED = Path("/sys/fs/cgroup/unified")
LAUNCHES = 7  # cudaLaunchKernel calls per request
COPY_BYTES = 12_345  # bytes cudaMemcpy'd host to device per request
SYNC_US = 2_000  # each stub synchronize sleeps this long
CUDA_BUCKET_NS = 200_000_000
PROCESS_MEMORY = 7_000_000_000


@dataclass
class PodServer:
    proc: subprocess.Popen[bytes]
    port: int
    pod_uid: str
    container_id: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _cgroup2_writable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    if not any(m.split()[1] == str(UNIFIED) and m.split()[2] == "cgroup2" for m in mounts):
        return f"no cgroup2 mounted at {UNIFIED}"
    return None


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("join_e2e")


@pytest.fixture(scope="module")
def server(tmp_module: Path) -> Iterator[PodServer]:
    """The server, moved into a kubelet-named cgroup right after it starts (before it serves)."""
    reason = _cgroup2_writable()
    if reason:
        pytest.skip(reason)
    stubs = build_cuda_stubs(tmp_module / "cuda")
    uid, cid = new_uid(), new_cid()
    leaf = UNIFIED / f"infersight-join-{secrets.token_hex(4)}.slice" / systemd_path(uid, cid).lstrip("/")
    created = [p for p in reversed([leaf, *leaf.parents]) if UNIFIED in p.parents and not p.exists()]
    for d in created:
        d.mkdir()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), LD_LIBRARY_PATH=str(stubs.dir), STUB_SYNC_US=str(SYNC_US))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.join_server", "--port", str(port), "--cudart", str(stubs.libcudart),
         "--launches", str(LAUNCHES), "--copy-bytes", str(COPY_BYTES)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    srv = PodServer(proc, port, uid, cid)
    try:
        (leaf / "cgroup.procs").write_text(f"{proc.pid}\n")

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                return httpx.get(f"{srv.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the join server")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for d in reversed(created):
            d.rmdir()


@pytest.fixture(scope="module")
def api(server: PodServer) -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    fake.put_replicaset(make_replicaset("llm-demo-6b8f9d", deployment="llm-demo", template_hash="6b8f9d"))
    fake.put_pod(make_pod("llm-demo-6b8f9d-x2k4p", namespace="serving", node=NODE, uid=server.pod_uid,
                          containers={"vllm": server.container_id},
                          owner=("apps/v1", "ReplicaSet", "llm-demo-6b8f9d"),
                          labels={"pod-template-hash": "6b8f9d"}))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def scenario(tmp_module: Path, server: PodServer) -> Iterator[Scenario]:
    sc = Scenario(tmp_module / "nvml-scenario.txt")
    sc.set({
        "driver": 1, "gpus": 1,
        "gpu0.uuid": GPU0, "gpu0.name": "NVIDIA H100 80GB HBM3", "gpu0.pci": "00000000:17:00.0",
        "gpu0.mem_total": 85_899_345_920, "gpu0.mem_used": 9_000_000_000,
        "gpu0.util_gpu": 60, "gpu0.util_mem": 20, "gpu0.power_mw": 300_000, "gpu0.energy_mj": 1_000_000_000,
        "gpu0.procs": 1, "gpu0.proc0.pid": server.pid, "gpu0.proc0.mem": PROCESS_MEMORY,
        "gpu0.proc0.sm": 45, "gpu0.proc0.memutil": 10,
    })
    old = os.environ.get(SCENARIO_ENV)
    os.environ[SCENARIO_ENV] = str(sc.path)
    yield sc
    if old is None:
        os.environ.pop(SCENARIO_ENV, None)
    else:
        os.environ[SCENARIO_ENV] = old


@dataclass
class Stack:
    agent: Agent
    join: Join
    metrics: SelfMetrics
    server: PodServer
    api: FakeApiServer
    cuda: CudaProbe


@pytest.fixture(scope="module")
def stack(tmp_module: Path, server: PodServer, api: FakeApiServer, scenario: Scenario) -> Iterator[Stack]:
    try:
        fake_lib = str(build_fake_nvml(tmp_module))
    except FakeNvmlUnavailable as e:
        pytest.skip(f"fake NVML cannot be built: {e}")
    metrics = SelfMetrics()
    nvml = NvmlCollector(NvmlConfig(period_s=0.1, event_timeout_ms=50), metrics=metrics, library_path=fake_lib)
    index = PodIndex(K8sConfig(node_name=NODE, api_url=api.url, backoff_initial_s=0.05, backoff_max_s=0.5),
                     metrics=metrics)
    kubelet = GpuPodMap(KubeletConfig(socket_path=str(tmp_module / "no-kubelet.sock"), poll_interval_s=0.5),
                        metrics=metrics)
    # the agent's own bucket, poll and settle times (agent/cli.py at --cuda-bucket-ms 200)
    cuda = CudaProbe(CudaProbeConfig(bucket_ns=CUDA_BUCKET_NS, poll_s=0.2, settle_ns=100_000_000, rescan_s=0.2),
                     metrics=metrics)
    assert cuda.enabled, "the CUDA probe's BPF program did not load"
    join = Join(JoinConfig(node_name=NODE, refresh_s=0.1, dcgm_enabled=False), pods=index, gpu_map=kubelet, nvml=nvml, cuda=cuda,
                resolver=PidResolver(metrics=metrics), metrics=metrics)
    sources: list[NvmlCollector | PodIndex | GpuPodMap | CudaProbe] = [nvml, index, kubelet, cuda]
    for s in sources:
        s.start()
    join.start()
    try:
        wait_for(lambda: index.synced, what="the pod index")
        # the join hands the server (a GPU process in NVML) to the CUDA probe, which finds the runtime
        wait_for(lambda: {lib.kind for lib in cuda.libraries(server.pid)} >= {"runtime"}, 30,
                 "the CUDA probe attached to the server's runtime")
        with running_agent(TargetConfig(pids=(server.pid,)), stages=[join]) as agent:
            yield Stack(agent, join, metrics, server, api, cuda)
    finally:
        join.stop()
        for s in reversed(sources):
            s.stop()


def stream_chat(st: Stack, i: int, ttft_s: float) -> None:
    body = {"model": "demo-llm", "stream": True, "max_tokens": 4, "ttft_s": ttft_s, "tpot_s": 0.01,
            "messages": [{"role": "user", "content": f"request {i}"}]}
    with httpx.stream("POST", f"{st.server.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        for _ in r.iter_bytes():
            pass


def one_request(st: Stack, i: int) -> Request:
    """One streamed chat completion; returns its record once the join has decorated it.

    The server answers at once after its CUDA calls, so the record reaches the join while
    their bucket is still in the kernel (the probe reads it in place). A pause of over one
    bucket before each request keeps every request's CUDA buckets its own."""
    time.sleep(CUDA_BUCKET_NS / 1e9 + 0.05)
    mark = st.agent.mark()
    stream_chat(st, i, ttft_s=0.0)
    return st.agent.wait_records(mark, 1, timeout=10)[0]


def assert_pod(attrs: dict[str, object], st: Stack) -> None:
    assert attrs["k8s.node.name"] == NODE
    assert attrs["k8s.namespace.name"] == "serving"
    assert attrs["k8s.pod.name"] == "llm-demo-6b8f9d-x2k4p"
    assert attrs["k8s.pod.uid"] == st.server.pod_uid
    assert attrs["k8s.container.name"] == "vllm"
    assert attrs["k8s.deployment.name"] == "llm-demo"


def assert_gpu(attrs: dict[str, object], rec: Request) -> None:
    assert attrs[A_UUIDS] == (GPU0,)
    assert attrs[A_GPU_SOURCE] == "nvml"  # no kubelet socket on this node
    assert attrs[A_UTIL_MEAN] == pytest.approx(0.6)
    assert attrs[A_POD_MEMORY_PEAK] == PROCESS_MEMORY
    assert attrs[A_POD_SM_SHARE] == 1.0
    assert attrs[A_ENERGY] == pytest.approx(300.0 * rec.duration_s)
    assert attrs[A_CUDA_LAUNCHES] == LAUNCHES
    assert attrs[A_CUDA_GRAPH_LAUNCHES] == 0
    assert attrs[A_CUDA_MEMCPY] == COPY_BYTES
    assert float(attrs[A_CUDA_SYNC]) >= SYNC_US / 1e6  # type: ignore[arg-type]


def test_records_carry_pod_deployment_gpu_window_and_cuda_launches(stack: Stack) -> None:
    for i in range(3):
        rec = one_request(stack, i)
        attrs = dict(rec.attributes)
        assert rec.pid == stack.server.pid and rec.status_code == 200
        assert_pod(attrs, stack)
        assert_gpu(attrs, rec)
    assert stack.metrics.total(FAILURES) == 0
    # the per-pod metrics carry the pod's labels, never a pid
    points = stack.join.points()
    names = {p.name for p in points}
    assert {"infersight.pod.gpu.time", "infersight.pod.gpu.utilization.share",
            "infersight.pod.gpu.memory.usage"} <= names
    for p in points:
        assert p.attributes["k8s.deployment.name"] == "llm-demo"
        assert "process.pid" not in p.attributes
    share = [p for p in points if p.name == "infersight.pod.gpu.utilization.share"]
    assert [(p.attributes["gpu.uuid"], p.value) for p in share] == [(GPU0, 1.0)]


def test_in_flight_requests_carry_the_deployment(stack: Stack) -> None:
    mark = stack.agent.mark()
    client = threading.Thread(target=stream_chat, args=(stack, 300, 1.5), daemon=True)
    client.start()
    try:
        active = wait_for(lambda: [a for a in stack.agent.pipeline.active() if a.pid == stack.server.pid], 10,
                          "the request in flight")
        decorated = stack.join.decorate_active(active)
        assert decorated[0].attributes["k8s.deployment.name"] == "llm-demo"
        assert decorated[0].attributes["k8s.pod.name"] == "llm-demo-6b8f9d-x2k4p"
    finally:
        client.join(10)
    stack.agent.wait_records(mark, 1, timeout=10)


def test_agent_keeps_joining_gpu_data_when_the_api_server_goes_away(stack: Stack) -> None:
    one_request(stack, 100)
    stack.api.stop()
    wait_for(lambda: stack.metrics.get(UP, UP_LABELS) == 0, 20, "the pod index to notice the outage")
    for i in range(2):
        rec = one_request(stack, 200 + i)
        attrs = dict(rec.attributes)
        assert_gpu(attrs, rec)
        # the index answers from what it last knew
        assert attrs["k8s.deployment.name"] == "llm-demo"
    assert stack.metrics.total(FAILURES) == 0
    assert stack.metrics.get("infersight.k8s.api.errors", (("reason", "unreachable"),)) >= 1
