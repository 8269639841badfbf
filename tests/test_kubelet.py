"""GpuPodMap against a fake kubelet serving the real pod-resources v1 API over a unix socket."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.selfmetrics import SelfMetrics
from collectors.kubelet import UP, UP_LABELS, GpuPodMap, KubeletConfig, StaticGpuPodMap, normalise_device_id
from tests.fakes.fake_kubelet import FakeKubelet, pod_resources

GPU0 = "GPU-8d4e1c2a-6f3b-4a5d-9e7c-1b2a3c4d5e6f"
GPU1 = "GPU-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
GPU2 = "GPU-99999999-aaaa-4bbb-8ccc-dddddddddddd"
# One MIG device as the device plugin names it on old (R450/R460) and new drivers, and as NVML reports it.
MIG_OLD = f"MIG-{GPU2}/1/0"
MIG_NEW = "MIG-5c3a2b1d-7e8f-5a9b-8c0d-1e2f3a4b5c6d"
MIG_OTHER = "MIG-0f0e0d0c-0b0a-5909-8807-060504030201"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short path: unix socket paths are limited to 107 bytes, and pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="kl-") as d:
        yield Path(d)


@pytest.fixture
def kubelet(sock_dir: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(str(sock_dir / "kubelet.sock"))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def config(path: str | Path, **kw: object) -> KubeletConfig:
    settings: dict[str, object] = {"rpc_timeout_s": 5.0, **kw}
    return KubeletConfig(socket_path=str(path), **settings)  # type: ignore[arg-type]


def test_maps_gpus_to_pods_and_ignores_other_resources(kubelet: FakeKubelet) -> None:
    kubelet.pods = [
        pod_resources("ml", "vllm-0", {"vllm": {"nvidia.com/gpu": [GPU0]}, "sidecar": {}}),
        pod_resources("ml", "trainer", {"main": {"nvidia.com/gpu": [GPU1], "example.com/fpga": ["fpga-0"]}}),
        pod_resources("default", "web", {"app": {"example.com/nic": ["nic-3"]}}),
    ]
    kubelet.allocatable = {"nvidia.com/gpu": [GPU0, GPU1, GPU2], "example.com/fpga": ["fpga-0"]}
    metrics = SelfMetrics()
    gpus = GpuPodMap(config(kubelet.socket_path), metrics=metrics)
    try:
        assert gpus.poll_once() is True
        assert gpus.available
        assert metrics.get(UP, UP_LABELS) == 1
        assert gpus.pod_of_device(GPU0) == ("ml", "vllm-0", "vllm")
        assert gpus.pod_of_device(GPU1) == ("ml", "trainer", "main")
        assert gpus.pod_of_device(GPU2) is None
        assert gpus.pod_of_device("fpga-0") is None
        assert gpus.devices_of_pod("ml", "vllm-0") == [GPU0]
        assert gpus.devices_of_pod("default", "web") == []
        assert gpus.devices_of_pod("ml", "absent") == []
        assert gpus.allocatable_devices() == [GPU0, GPU1, GPU2]
        assert kubelet.calls["List"] == 1 and kubelet.calls["GetAllocatableResources"] == 1
    finally:
        gpus.stop()


def test_mig_devices_are_normalised_to_nvml_uuids(kubelet: FakeKubelet) -> None:
    kubelet.pods = [
        # mixed strategy, old-driver ID form
        pod_resources("ml", "small-a", {"c": {"nvidia.com/mig-1g.10gb": [MIG_OLD]}}),
        # single strategy: MIG devices advertised as nvidia.com/gpu, new-driver form, unknown to NVML
        pod_resources("ml", "small-b", {"c": {"nvidia.com/gpu": [MIG_OTHER]}}),
        pod_resources("ml", "small-c", {"c": {"nvidia.com/mig-3g.40gb": [MIG_NEW]}}),
    ]
    calls = []

    def aliases() -> dict[str, str]:  # what the NVML collector would supply, re-read every poll
        calls.append(1)
        return {MIG_OLD: MIG_NEW}

    gpus = GpuPodMap(config(kubelet.socket_path), mig_aliases=aliases, metrics=SelfMetrics())
    try:
        assert gpus.poll_once()
        assert gpus.devices_of_pod("ml", "small-a") == [MIG_NEW]
        assert gpus.devices_of_pod("ml", "small-b") == [MIG_OTHER]  # unknown: kept raw
        # The old and new form named the same MIG device, so it now has two holders.
        assert gpus.pods_of_device(MIG_NEW) == [("ml", "small-a", "c"), ("ml", "small-c", "c")]
        assert gpus.pod_of_device(MIG_OTHER) == ("ml", "small-b", "c")
        assert calls == [1]
    finally:
        gpus.stop()


def test_failing_alias_source_keeps_raw_ids(kubelet: FakeKubelet) -> None:
    kubelet.pods = [pod_resources("ml", "p", {"c": {"nvidia.com/mig-1g.10gb": [MIG_OLD]}})]

    def broken() -> dict[str, str]:
        raise RuntimeError("NVML not initialised")

    metrics = SelfMetrics()
    gpus = GpuPodMap(config(kubelet.socket_path), mig_aliases=broken, metrics=metrics)
    assert gpus.poll_once()
    assert gpus.devices_of_pod("ml", "p") == [MIG_OLD]
    assert metrics.get("infersight.kubelet.errors", (("reason", "mig_aliases"),)) == 1
    gpus.stop()


def test_time_sliced_gpu_has_several_holders(kubelet: FakeKubelet) -> None:
    kubelet.pods = [
        pod_resources("ml", "a", {"c": {"nvidia.com/gpu": [f"{GPU0}::0"]}}),
        pod_resources("ml", "b", {"c": {"nvidia.com/gpu.shared": [f"{GPU0}::3"]}}),
    ]
    gpus = GpuPodMap(config(kubelet.socket_path), metrics=SelfMetrics())
    try:
        assert gpus.poll_once()
        assert gpus.pods_of_device(GPU0) == [("ml", "a", "c"), ("ml", "b", "c")]
        assert gpus.pod_of_device(GPU0) is None  # naming one pod would be wrong
        assert gpus.devices_of_pod("ml", "b") == [GPU0]
        # The in-memory double, given the same assignments, answers the same.
        double = StaticGpuPodMap({GPU0: gpus.pods_of_device(GPU0)})
        assert double.pod_of_device(GPU0) is None and double.pods_of_device(GPU0) == gpus.pods_of_device(GPU0)
        assert double.devices_of_pod("ml", "b") == [GPU0] and double.devices_of_pod("ml", "z") == []
        assert StaticGpuPodMap({GPU1: [("ml", "x", "c")]}).pod_of_device(GPU1) == ("ml", "x", "c")
    finally:
        gpus.stop()


def test_normalise_device_id() -> None:
    assert normalise_device_id(GPU0, {}) == GPU0
    assert normalise_device_id(f"{GPU0}::7", {}) == GPU0
    assert normalise_device_id(MIG_OLD, {MIG_OLD: MIG_NEW}) == MIG_NEW
    assert normalise_device_id(f"{MIG_OLD}::1", {MIG_OLD: MIG_NEW}) == MIG_NEW


def test_old_kubelet_without_allocatable_still_maps(kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture) -> None:
    kubelet.allocatable_unimplemented = True
    kubelet.pods = [pod_resources("ml", "p", {"c": {"nvidia.com/gpu": [GPU1]}})]
    metrics = SelfMetrics()
    gpus = GpuPodMap(config(kubelet.socket_path), metrics=metrics)
    try:
        assert gpus.poll_once() and gpus.poll_once()
        assert gpus.pod_of_device(GPU1) == ("ml", "p", "c")
        assert gpus.allocatable_devices() == []
        assert metrics.get("infersight.kubelet.errors", (("reason", "allocatable_unimplemented"),)) == 2
        assert metrics.get(UP, UP_LABELS) == 1
        assert sum("GetAllocatableResources" in r.getMessage() for r in caplog.records) <= 1
    finally:
        gpus.stop()


def test_device_bound_is_counted(kubelet: FakeKubelet) -> None:
    kubelet.pods = [pod_resources("ml", "big", {"c": {"nvidia.com/gpu": [GPU0, GPU1, GPU2]}})]
    metrics = SelfMetrics()
    gpus = GpuPodMap(config(kubelet.socket_path, max_devices=2), metrics=metrics)
    assert gpus.poll_once()
    assert gpus.devices_of_pod("ml", "big") == [GPU0, GPU1]
    assert metrics.get("infersight.kubelet.devices.dropped") == 1
    gpus.stop()


def test_socket_absent_degrades_then_recovers(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sock_dir / "kubelet.sock"
    metrics = SelfMetrics()
    gpus = GpuPodMap(config(path), metrics=metrics)
    caplog.set_level(logging.INFO, logger="collectors.kubelet")
    for _ in range(3):
        assert gpus.poll_once() is False
    assert not gpus.available
    assert metrics.get(UP, UP_LABELS) == 0
    assert metrics.get("infersight.kubelet.errors", (("reason", "socket_absent"),)) == 3
    assert gpus.pod_of_device(GPU0) is None and gpus.devices_of_pod("ml", "p") == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    # The kubelet comes up (or the mount appears): the next poll maps.
    fake = FakeKubelet(str(path))
    fake.pods = [pod_resources("ml", "p", {"c": {"nvidia.com/gpu": [GPU0]}})]
    fake.start()
    try:
        assert gpus.poll_once() is True
        assert gpus.pod_of_device(GPU0) == ("ml", "p", "c")
        assert metrics.get(UP, UP_LABELS) == 1
        assert any("answering again" in r.getMessage() for r in caplog.records)
    finally:
        gpus.stop()
        fake.stop()


def test_kubelet_going_away_clears_the_map(kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture) -> None:
    kubelet.pods = [pod_resources("ml", "p", {"c": {"nvidia.com/gpu": [GPU0]}})]
    metrics = SelfMetrics()
    gpus = GpuPodMap(config(kubelet.socket_path, rpc_timeout_s=1.0), metrics=metrics)
    try:
        assert gpus.poll_once()
        kubelet.stop()
        # A socket file left behind by a crashed kubelet: present, but nobody answers.
        Path(kubelet.socket_path).touch()
        assert gpus.poll_once() is False
        assert gpus.pod_of_device(GPU0) is None
        assert metrics.get(UP, UP_LABELS) == 0
        assert metrics.total("infersight.kubelet.errors") == 1
        Path(kubelet.socket_path).unlink()
        kubelet.start()  # a restarted kubelet makes a new socket at the same path
        assert gpus.poll_once() is True
        assert gpus.pod_of_device(GPU0) == ("ml", "p", "c")
    finally:
        gpus.stop()


def test_background_polling_follows_changes(kubelet: FakeKubelet) -> None:
    kubelet.pods = [pod_resources("ml", "a", {"c": {"nvidia.com/gpu": [GPU0]}})]
    gpus = GpuPodMap(config(kubelet.socket_path, poll_interval_s=0.05), metrics=SelfMetrics())
    gpus.start()
    try:
        assert wait_until(lambda: gpus.pod_of_device(GPU0) == ("ml", "a", "c"))
        kubelet.pods = [pod_resources("ml", "b", {"c": {"nvidia.com/gpu": [GPU0]}})]  # GPU reassigned
        assert wait_until(lambda: gpus.pod_of_device(GPU0) == ("ml", "b", "c"))
        assert gpus.devices_of_pod("ml", "a") == []
    finally:
        gpus.stop()
    polls = kubelet.calls["List"]
    assert polls >= 2
    # Stopped means stopped: no poll after stop() returned.
    assert not wait_until(lambda: kubelet.calls["List"] > polls, timeout=0.3)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        GpuPodMap(KubeletConfig(poll_interval_s=0))
    with pytest.raises(ValueError):
        GpuPodMap(KubeletConfig(max_devices=0))
