"""The join: ``k8s.*`` and ``gpu.window.*`` attributes for every record, and per-pod GPU metrics.

One stage of the pipeline (``Pipeline(..., stages=[join])``). For each record it
goes from the serving process to its pod

    pid ──cgroup path──► container ID / pod UID ──PodIndex──► pod, owner (Deployment via ReplicaSet)

and from the pod to the GPUs it holds and what they did during the request's own
window ``[start, end]``:

    pod ──kubelet pod-resources (GpuPodMap)──► GPU / MIG UUIDs
        (no kubelet socket: NVML's process list, pids mapped to the pod through cgroups)
    GPUs ──NvmlCollector.device_windows──► mean utilisation over the window
         ──DcgmCollector.device_window──► SM active / occupancy, tensor pipe, DRAM (when dcgm-exporter runs)
    pod's processes ──NvmlCollector.process_windows──► peak memory, SM utilisation (→ the pod's SM share)
    pod's processes ──CudaProbe.window──► kernel launches, bytes copied, synchronize time

The ``gpu.window.*`` attributes describe the window, not work owned by the
request: a batching server serves many requests at once on the same GPUs, and
every one of them sees the same window statistics. ``docs/join.md`` lists every
attribute and metric with its meaning.

Derived per-pod metrics (:meth:`Join.points`) are accounted on the join's own
thread from GPU time, not summed over requests, so concurrent requests do not
count the same GPU-second twice: each ``refresh_s`` the pods on a GPU are
charged the elapsed time and the GPU's energy in proportion to their share
(1 for a GPU or MIG device a pod holds alone; the pod's SM utilisation over the
GPU's under time-slicing or MPS), and the records add their output tokens.

Degradation, one feature per source, each visible in the self-metrics:
no API server → no ``k8s.*`` pod attributes (``infersight.join.k8s.missing``);
no kubelet → GPUs from NVML's process list; no NVML → no ``gpu.*`` attributes
(``infersight.join.gpu.missing``); no CUDA probe → no ``gpu.window.cuda.*``.
``__call__`` never raises: a failing join returns the record unchanged and
counts ``infersight.join.failures``.

Threading: ``__call__`` and :meth:`Join.active_decorator` run on the caller's
thread (the pipeline's assembly thread, the exporters' collection) and do no
network I/O: they read the collectors' in-memory state and, for a process not
seen before, two small ``/proc`` files (cached by :class:`PidResolver`).
:meth:`Join.start` runs one refresh thread, which maps GPU and CUDA processes
to pods, adds the pods' processes to the CUDA probe (attaching takes tens of
ms, so never on the assembly thread) and accounts the per-pod metrics.
:meth:`Join.points` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Protocol

from agent.record import ActiveRequest, Request
from agent.selfmetrics import SELF_METRICS, BoundCounter, SelfMetrics
from collectors.cgroup import ContainerRef, PidResolver, PidResolverConfig, process_start_time
from collectors.history import WindowStats
from collectors.k8s import K8sConfig, PodInfo, PodLookup
from collectors.kubelet import DEFAULT_SOCKET, KubeletConfig, PodContainer
from collectors.nvml import GpuDevice, MetricPoint, prometheus_name

log = logging.getLogger(__name__)

FAILURES: Final = "infersight.join.failures"
K8S_MISSING: Final = "infersight.join.k8s.missing"
GPU_MISSING: Final = "infersight.join.gpu.missing"
GPU_SOURCE: Final = "infersight.join.gpu.source"
PIDS_DROPPED: Final = "infersight.join.pids.dropped"
PODS_DROPPED: Final = "infersight.join.pods.dropped"
CUDA_TARGETS: Final = "infersight.join.cuda.targets"

# ---- the attributes (docs/join.md describes each) ------------------------------------------
A_UUIDS: Final = "gpu.uuids"
A_GPU_SOURCE: Final = "gpu.source"
A_UTIL_MEAN: Final = "gpu.window.utilization.mean"
A_SAMPLES: Final = "gpu.window.samples"
A_POD_MEMORY_PEAK: Final = "gpu.window.pod.memory.peak"
A_POD_SM_SHARE: Final = "gpu.window.pod.sm_share"
A_ENERGY: Final = "gpu.window.pod.energy"
A_CUDA_LAUNCHES: Final = "gpu.window.cuda.launches"
A_CUDA_GRAPH_LAUNCHES: Final = "gpu.window.cuda.graph_launches"
A_CUDA_MEMCPY: Final = "gpu.window.cuda.memcpy.bytes"
A_CUDA_SYNC: Final = "gpu.window.cuda.sync.seconds"
A_CUDA_SPAN: Final = "gpu.window.cuda.span.seconds"

#: DCGM profiling field → the window attribute holding its mean over the pod's GPUs (data, not code).
DCGM_WINDOW_ATTRIBUTES: Mapping[str, str] = MappingProxyType({
    "DCGM_FI_PROF_SM_ACTIVE": "gpu.window.sm.active.mean",
    "DCGM_FI_PROF_SM_OCCUPANCY": "gpu.window.sm.occupancy.mean",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "gpu.window.tensor.active.mean",
    "DCGM_FI_PROF_DRAM_ACTIVE": "gpu.window.dram.active.mean",
})
# the fields a record's window reads: a window costs its keys times the fields summarised
DCGM_RECORD_FIELDS: Final = tuple(DCGM_WINDOW_ATTRIBUTES)
RECORD_DEVICE_FIELDS: Final = ("utilization.gpu", "power.draw")
RECORD_PROCESS_FIELDS: Final = ("process.memory.used", "process.sm")


# ---- what the join needs of each source ------------------------------------------------------


class NvmlReader(Protocol):
    """What the join reads of :class:`collectors.nvml.NvmlCollector` (all in memory, thread-safe)."""

    #: len(devices())
    device_count: int

    def devices(self) -> list[GpuDevice]: ...
    def device_window(
        self, uuid: str, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None: ...
    def device_windows(
        self, uuids: Sequence[str], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]: ...
    def process_windows(
        self, pids: Sequence[int], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]: ...
    def processes(self) -> Mapping[int, Sequence[str]]: ...
    def process_points(self) -> list[tuple[int, MetricPoint]]: ...


class DcgmReader(Protocol):
    """What the join reads of :class:`collectors.dcgm.DcgmCollector` (in memory, thread-safe)."""

    def device_window(
        self, uuid: str, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None: ...


class CudaWindowLike(Protocol):
    @property
    def start_unix_nano(self) -> int: ...
    @property
    def end_unix_nano(self) -> int: ...
    @property
    def launches(self) -> int: ...
    @property
    def graph_launches(self) -> int: ...
    @property
    def memcpy_htod_bytes(self) -> int: ...
    @property
    def memcpy_dtoh_bytes(self) -> int: ...
    @property
    def memcpy_dtod_bytes(self) -> int: ...
    @property
    def memcpy_other_bytes(self) -> int: ...
    @property
    def sync_ns(self) -> int: ...


class CudaReader(Protocol):
    """What the join needs of :class:`probes.cuda.CudaProbe`."""

    def window(self, pid: int, t0_ns: int, t1_ns: int) -> CudaWindowLike | None: ...
    def add_pid(self, pid: int) -> None: ...
    def pids(self) -> list[int]: ...


class GpuMap(Protocol):
    """What the join needs of :class:`collectors.kubelet.GpuPodMap` (or ``StaticGpuPodMap``)."""

    @property
    def available(self) -> bool: ...
    def devices_of_pod(self, namespace: str, name: str) -> list[str]: ...
    def pods_of_device(self, uuid: str) -> list[PodContainer]: ...


class _Lifecycle(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


# ---- config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinConfig:
    """Settings of the join; validated once, in ``__post_init__`` (ValueError)."""

    node_name: str | None = field(default_factory=lambda: os.environ.get("NODE_NAME") or None)
    """This node (env ``NODE_NAME``, from the downward API); its pods are the only ones indexed."""
    api_url: str | None = None
    """Explicit API server URL (tests, ``kubectl proxy``); None: in-cluster config, then kubeconfig."""
    kubelet_socket: str = DEFAULT_SOCKET
    """The kubelet pod-resources socket (a read-only hostPath mount)."""
    k8s_enabled: bool = True
    """Add ``k8s.*`` pod attributes (needs the API server)."""
    kubelet_enabled: bool = True
    """Ask the kubelet which GPUs each pod holds (else NVML's process list only)."""
    gpu_enabled: bool = True
    """Add ``gpu.*`` attributes and per-pod GPU metrics (needs NVML)."""
    cuda_enabled: bool = True
    """Add ``gpu.window.cuda.*`` (needs the CUDA probe) and trace the pods' processes with it."""
    dcgm_enabled: bool = True
    """Add DCGM profiling means (SM active, tensor pipe, DRAM) when dcgm-exporter runs on the node."""
    refresh_s: float = 1.0
    """Period of the refresh thread: process → pod mapping, CUDA targets, per-pod accounting."""
    max_pids: int = 4096
    """Processes remembered by the refresh (served and GPU processes); more are dropped and counted."""
    max_pods: int = 512
    """Pods with per-pod metrics (one series set each); more are dropped and counted."""
    ratio_window_s: float = 60.0
    """The per-output-token gauges divide GPU time and energy by tokens over this many past seconds."""
    stale_s: float = 5.0
    """Per-pod share and memory gauges leave :meth:`Join.points` when not refreshed for this long."""
    pod_retention_s: float = 900.0
    """A pod neither on a GPU nor serving for this long loses its per-pod series (deleted pods go)."""
    proc: str = "/proc"
    """Where the host's /proc is (a DaemonSet mounts it at /host/proc)."""

    def __post_init__(self) -> None:
        if min(self.refresh_s, self.ratio_window_s, self.stale_s, self.pod_retention_s) <= 0:
            raise ValueError("JoinConfig.refresh_s, ratio_window_s, stale_s and pod_retention_s must be positive")
        if self.max_pids < 1 or self.max_pods < 1:
            raise ValueError("JoinConfig.max_pids and max_pods must be at least 1")

    def k8s_config(self) -> K8sConfig:
        return K8sConfig(node_name=self.node_name, api_url=self.api_url)

    def kubelet_config(self) -> KubeletConfig:
        return KubeletConfig(socket_path=self.kubelet_socket)


# ---- derived metric definitions (data, as gpu_metrics.csv is) -------------------------------


@dataclass(frozen=True, slots=True)
class _Derived:
    name: str
    unit: str
    kind: str
    help: str

    @property
    def prom_name(self) -> str:
        return prometheus_name(self.name, self.unit, self.kind)

    def point(self, attributes: Mapping[str, str], value: float) -> MetricPoint:
        return MetricPoint(self.name, self.prom_name, self.unit, self.kind, self.help, dict(attributes), value)


POD_SHARE = _Derived(
    "infersight.pod.gpu.utilization.share", "1", "gauge",
    "The pod's share of the GPU: 1 for a GPU or MIG device it holds alone, else its processes' SM "
    "utilisation over the GPU's (time-slicing, MPS)")
POD_MEMORY = _Derived(
    "infersight.pod.gpu.memory.usage", "By", "gauge", "GPU memory used by the pod's processes on the GPU")
POD_GPU_TIME = _Derived(
    "infersight.pod.gpu.time", "s", "counter",
    "GPU-seconds charged to the pod: elapsed time on each GPU it holds times its share of that GPU")
POD_ENERGY = _Derived(
    "infersight.pod.gpu.energy", "J", "counter",
    "GPU energy charged to the pod: NVML energy of each GPU it holds times its share of that GPU")
POD_TOKENS = _Derived(
    "infersight.pod.output_tokens", "{token}", "counter", "Output tokens of the pod's recorded requests")
POD_TIME_PER_TOKEN = _Derived(
    "infersight.pod.gpu.time_per_output_token", "s", "gauge",
    "GPU-seconds charged to the pod per output token, over the last ratio_window_s")
POD_ENERGY_PER_TOKEN = _Derived(
    "infersight.pod.gpu.energy_per_output_token", "J", "gauge",
    "GPU energy charged to the pod per output token, over the last ratio_window_s")

#: Every derived metric, for the instrument and dashboard tests.
DERIVED_METRICS: tuple[_Derived, ...] = (
    POD_SHARE, POD_MEMORY, POD_GPU_TIME, POD_ENERGY, POD_TOKENS, POD_TIME_PER_TOKEN, POD_ENERGY_PER_TOKEN)


# ---- snapshots ------------------------------------------------------------------------------


class _Group:
    """The processes of one pod (or, outside Kubernetes, one container or one process).

    Immutable (``Final`` fields); a plain class, since a frozen dataclass's ``__init__`` costs
    a record on the join's path a few tenths of a microsecond more."""

    __slots__ = ("key", "pids", "pod")

    def __init__(self, key: str, pod: PodInfo | None, pids: frozenset[int]) -> None:
        self.key: Final = key
        self.pod: Final = pod
        self.pids: Final = pids


@dataclass(frozen=True)
class _Snapshot:
    """What the refresh thread learnt; swapped whole, read without a lock."""

    group_of_pid: Mapping[int, str] = field(default_factory=dict)
    groups: Mapping[str, _Group] = field(default_factory=dict)
    # uuid -> group keys with a process on it (NVML)
    holders: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class _PodAccount:
    """Per-pod accounting; guarded by ``Join._lock``."""

    attributes: dict[str, str]
    seen: float
    """Monotonic time the pod last served a record or was seen on a GPU."""
    on_gpu: bool = False
    """Whether the pod has held a GPU (only then are GPU time and energy exported)."""
    gpu_seconds: float = 0.0
    energy_j: float = 0.0
    tokens: float = 0.0
    # (monotonic s, cumulative gpu seconds, joules, tokens) at each refresh, for the per-token gauges
    recent: deque[tuple[float, float, float, float]] = field(default_factory=deque)
    # uuid -> (share, memory bytes or None, monotonic s)
    gauges: dict[str, tuple[float | None, float | None, float]] = field(default_factory=dict)


def _group_key(ref: ContainerRef | None, pid: int) -> str:
    if ref is None:
        return f"pid:{pid}"
    if ref.pod_uid is not None:
        return f"pod:{ref.pod_uid}"
    return f"container:{ref.container_id}"


class Join:
    """The pipeline stage that decorates records; see the module docstring.

    Sources are constructor parameters with the production default built from
    ``config`` when left None (``PodIndex``, ``GpuPodMap``, ``NvmlCollector``,
    ``CudaProbe``) and a feature flag turned off. The join starts and stops the
    sources it built; sources passed in are the caller's to start and stop.
    The constructor raises ValueError for a bad config; nothing raises after it.
    """

    def __init__(
        self,
        config: JoinConfig | None = None,
        *,
        pods: PodLookup | None = None,
        gpu_map: GpuMap | None = None,
        nvml: NvmlReader | None = None,
        cuda: CudaReader | None = None,
        dcgm: DcgmReader | None = None,
        resolver: PidResolver | None = None,
        metrics: SelfMetrics = SELF_METRICS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """``clock`` (monotonic seconds) paces the accounting; ``wall_clock`` (Unix ns) is the
        time the collectors' histories are indexed by."""
        self.config = cfg = config or JoinConfig()
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._owned: list[_Lifecycle] = []
        self._resolver = resolver or PidResolver(PidResolverConfig(), proc=cfg.proc, metrics=metrics)
        if pods is None and cfg.k8s_enabled:
            from collectors.k8s import PodIndex

            index = PodIndex(cfg.k8s_config(), metrics=metrics)
            self._owned.append(index)
            pods = index
        if gpu_map is None and cfg.gpu_enabled and cfg.kubelet_enabled:
            from collectors.kubelet import GpuPodMap

            kubelet = GpuPodMap(cfg.kubelet_config(), mig_aliases=self._mig_aliases, metrics=metrics)
            self._owned.append(kubelet)
            gpu_map = kubelet
        if nvml is None and cfg.gpu_enabled:
            from collectors.nvml import NvmlCollector

            collector = NvmlCollector(metrics=metrics)
            self._owned.append(collector)
            nvml = collector
        if cuda is None and cfg.gpu_enabled and cfg.cuda_enabled:
            from probes.cuda import CudaProbe  # compiles BPF: only when the agent really wants it

            probe = CudaProbe(metrics=metrics, proc=cfg.proc)
            self._owned.append(probe)
            cuda = probe
        if dcgm is None and cfg.gpu_enabled and cfg.dcgm_enabled:
            from collectors.dcgm import DcgmCollector

            nvml_devices = nvml.devices if nvml is not None else None
            scraper = DcgmCollector(devices=nvml_devices, metrics=metrics)
            self._owned.append(scraper)
            dcgm = scraper
        self._pods = pods if cfg.k8s_enabled else None
        self._gpu_map = gpu_map if cfg.gpu_enabled and cfg.kubelet_enabled else None
        self._nvml = nvml if cfg.gpu_enabled else None
        self._cuda = cuda if cfg.gpu_enabled and cfg.cuda_enabled else None
        self._dcgm = dcgm if cfg.gpu_enabled and cfg.dcgm_enabled else None
        self._snapshot = _Snapshot()
        self._lock = threading.Lock()
        # pids that served records, most recent last (bounded by max_pids)
        self._served: OrderedDict[int, None] = OrderedDict()
        self._last_served = -1  # the pid at the end of _served
        # metric name -> label value -> its counter, for the per-record counts
        self._counters: dict[str, dict[str, BoundCounter]] = {}
        self._accounts: OrderedDict[str, _PodAccount] = OrderedDict()
        self._last_tick: float | None = None
        self._last_energy: dict[str, float] = {}
        # (pid, start time) handed to the CUDA probe, so a refused process is not retried every refresh
        self._cuda_tried: OrderedDict[tuple[int, int | None], None] = OrderedDict()
        self._logged: set[str] = set()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.__name__ = "join"  # the pipeline labels stage errors with it
        m = metrics
        m.describe(FAILURES, "counter", "Records the join could not decorate (passed on unchanged).")
        m.describe(K8S_MISSING, "counter", "Records without k8s pod attributes, by reason.")
        m.describe(GPU_MISSING, "counter", "Records without gpu attributes, by reason.")
        m.describe(GPU_SOURCE, "counter", "Records whose GPUs came from the kubelet or from NVML's process list.")
        m.describe(PIDS_DROPPED, "counter", "Processes the join did not remember because max_pids was reached.")
        m.describe(PODS_DROPPED, "counter", "Pods without per-pod metrics because max_pods was reached.")
        m.describe(CUDA_TARGETS, "counter", "Processes the join handed to the CUDA probe.")

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sources the join built, then the refresh thread. Returns at once; never raises."""
        if self._worker is not None:
            return
        for source in self._owned:
            try:
                source.start()
            except Exception:  # a source that cannot start degrades its feature only
                log.exception("join: %s failed to start", type(source).__name__)
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name="infersight-join", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Stop the refresh thread and the sources the join built."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
            self._worker = None
        for source in reversed(self._owned):
            try:
                source.stop()
            except Exception:
                log.exception("join: %s failed to stop", type(source).__name__)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a bug here must not kill the agent; it shows in the metric
                self._metrics.inc(FAILURES, labels=(("stage", "refresh"),))
                self._log_once("refresh", "join: refresh failed", exc_info=True)
            self._stop.wait(self.config.refresh_s)

    # ---- the stage ----------------------------------------------------------------------------

    def __call__(self, record: Request) -> Request:
        """``record`` with ``k8s.*`` and ``gpu.*`` attributes added. Never raises."""
        try:
            return self._join(record)
        except Exception:
            self._metrics.inc(FAILURES, labels=(("stage", "record"),))
            self._log_once("record", "join: a record could not be joined; passed on unchanged", exc_info=True)
            return record

    def active_decorator(self, active: ActiveRequest) -> ActiveRequest:
        """``active`` with the ``k8s.*`` attributes of its process (so in-flight gauges carry the
        pod and deployment). No GPU work; never raises."""
        try:
            attrs = self._k8s_attributes(active.pid, count=False)[0]
            if not attrs:
                return active
            merged = dict(active.attributes)
            merged.update(attrs)
            return replace(active, attributes=MappingProxyType(merged))
        except Exception:
            self._metrics.inc(FAILURES, labels=(("stage", "active"),))
            self._log_once("active", "join: an in-flight request could not be decorated", exc_info=True)
            return active

    def decorate_points(self, points: Iterable[Any]) -> list[Any]:
        """Device-level GPU points (NVML, DCGM) with the ``k8s.*`` attributes of the one pod that
        holds the device, as dcgm-exporter labels them. A GPU shared by several pods (time-slicing,
        MPS) keeps device attributes only: per-pod shares are in :meth:`points`. Never raises."""
        out = []
        holders_cache: dict[str, dict[str, str] | None] = {}
        for p in points:
            uuid = p.attributes.get("gpu.uuid") if hasattr(p, "attributes") else None
            if uuid is None:
                out.append(p)
                continue
            if uuid not in holders_cache:
                try:
                    holders_cache[uuid] = self._sole_holder(uuid)
                except Exception:
                    self._metrics.inc(FAILURES, labels=(("stage", "points"),))
                    holders_cache[uuid] = None
            attrs = holders_cache[uuid]
            if attrs:
                p = dataclasses.replace(p, attributes={**p.attributes, **attrs})
            out.append(p)
        return out

    def _sole_holder(self, uuid: str) -> dict[str, str] | None:
        gm = self._gpu_map
        if gm is not None and gm.available:
            held = gm.pods_of_device(uuid)
            if len(held) == 1:
                ns, name, container = held[0]
                attrs = {"k8s.namespace.name": ns, "k8s.pod.name": name}
                if container:
                    attrs["k8s.container.name"] = container
                return attrs
            if held:
                return None
        keys = self._snapshot.holders.get(uuid, frozenset())
        if len(keys) != 1:
            return None
        group = self._snapshot.groups.get(next(iter(keys)))
        if group is None or group.pod is None:
            return None
        return group.pod.attributes()

    def decorate_active(self, actives: Iterable[ActiveRequest]) -> list[ActiveRequest]:
        """:meth:`active_decorator` over a list (wrap ``Pipeline.active`` with it for the exporters)."""
        return [self.active_decorator(a) for a in actives]

    def _join(self, record: Request) -> Request:
        attrs, pod, ref = self._k8s_attributes(record.pid, count=True)
        self._remember_served(record.pid)
        if record.output_tokens and pod is not None:
            self._add_tokens(pod, record.output_tokens)
        attrs.update(self._gpu_attributes(record, ref, pod))
        return record.with_attributes(attrs) if attrs else record

    # ---- k8s ----------------------------------------------------------------------------------

    def _k8s_attributes(self, pid: int, *, count: bool) -> tuple[dict[str, Any], PodInfo | None, ContainerRef | None]:
        attrs: dict[str, Any] = {}
        if self.config.node_name:
            attrs["k8s.node.name"] = self.config.node_name
        ref = self._resolver.resolve(pid)
        if self._pods is None:
            if count:
                self._count(K8S_MISSING, "reason", "disabled")
            return attrs, None, ref
        pod: PodInfo | None = None
        if ref is not None:
            pod = self._pods.by_container(ref.container_id)
            if pod is None and ref.pod_uid is not None:
                pod = self._pods.by_uid(ref.pod_uid)
        if pod is None:
            if count:
                reason = "not_in_container" if ref is None else "not_in_pod" if ref.pod_uid is None else "pod_unknown"
                self._count(K8S_MISSING, "reason", reason)
            return attrs, None, ref
        attrs.update(pod.attributes(ref.container_id if ref is not None else None))
        return attrs, pod, ref

    # ---- gpu ----------------------------------------------------------------------------------

    def _gpu_attributes(self, record: Request, ref: ContainerRef | None, pod: PodInfo | None) -> dict[str, Any]:
        nvml = self._nvml
        if nvml is None:
            self._count(GPU_MISSING, "reason", "disabled")
            return {}
        procs: Mapping[int, Sequence[str]] | None = None
        gm = self._gpu_map
        if gm is None or pod is None or not gm.available:
            # no kubelet assignment to look up: with no GPU process on the node, the
            # record's process group is not needed
            procs = nvml.processes()
        if procs is not None and not procs:
            return self._no_gpu(nvml)
        group = self._group_for(record.pid, ref, pod)
        uuids, source = self._gpus_of(group, procs)
        if not uuids:
            return self._no_gpu(nvml)
        self._count(GPU_SOURCE, "source", source)
        t0, t1 = record.start_time_unix_nano, record.end_time_unix_nano
        out: dict[str, Any] = {A_UUIDS: tuple(uuids), A_GPU_SOURCE: source}
        device_stats = dict(zip(uuids, nvml.device_windows(uuids, t0, t1, RECORD_DEVICE_FIELDS), strict=True))
        utils = [w.mean["utilization.gpu"] for w in device_stats.values() if w and "utilization.gpu" in w.mean]
        samples = sum(w.samples for w in device_stats.values() if w is not None)
        if samples:
            out[A_SAMPLES] = samples
        util_mean = sum(utils) / len(utils) if utils else None
        if util_mean is not None:
            out[A_UTIL_MEAN] = util_mean
        placed = procs if procs is not None else nvml.processes()  # one snapshot per record
        pids = sorted(group.pids)
        by_pid = dict(zip(pids, nvml.process_windows(pids, t0, t1, RECORD_PROCESS_FIELDS), strict=True))
        proc_stats = [w for w in by_pid.values() if w is not None]
        peaks = [w.max_sum["process.memory.used"] for w in proc_stats if "process.memory.used" in w.max_sum]
        if peaks:
            # a process's peaks on each of its GPUs added, and the pod's processes' added: an upper
            # bound on the pod's peak, exact for one process on one GPU
            out[A_POD_MEMORY_PEAK] = sum(peaks)
        # the pod's SM use per GPU: a process's window mean is its per-GPU average, so it counts
        # on each GPU NVML places it on (tensor parallelism: one process per GPU)
        sm_by_gpu: dict[str, float] = {}
        for pid, w in by_pid.items():
            if w is not None and "process.sm" in w.mean:
                for u in [u for u in placed.get(pid, ()) if u in uuids] or uuids:
                    sm_by_gpu[u] = sm_by_gpu.get(u, 0.0) + w.mean["process.sm"]
        shares = []
        for u in uuids:
            w = device_stats[u]
            util_u = w.mean.get("utilization.gpu") if w is not None else None
            shares.append(self._share(u, group, sm_by_gpu.get(u), util_u))
        if shares and all(s is not None for s in shares):
            share = sum(s for s in shares if s is not None) / len(shares)
            out[A_POD_SM_SHARE] = share
            energy = 0.0
            have_energy = False
            for u, s in zip(uuids, shares, strict=True):
                w = device_stats[u]
                if w is not None and "power.draw" in w.mean and s is not None:
                    energy += w.mean["power.draw"] * max(0, t1 - t0) / 1e9 * s
                    have_energy = True
            if have_energy:
                out[A_ENERGY] = energy
        if not samples and not proc_stats:
            self._count(GPU_MISSING, "reason", "no_samples")
        out.update(self._dcgm_attributes(uuids, t0, t1))
        out.update(self._cuda_attributes(group, t0, t1))
        return out

    def _count(self, name: str, label: str, value: str) -> None:
        """Count a record in ``name{label=value}`` (one label per metric here), through a
        counter bound at its first use."""
        by_value = self._counters.get(name)
        if by_value is None:
            by_value = self._counters[name] = {}
        c = by_value.get(value)
        if c is None:
            c = by_value[value] = self._metrics.counter(name, ((label, value),))
        c.inc()

    def _no_gpu(self, nvml: NvmlReader) -> dict[str, Any]:
        """Count a record that no GPU was found for, and why."""
        reason = "no_gpu" if nvml.device_count else "nvml_unavailable"
        self._count(GPU_MISSING, "reason", reason)
        return {}

    def _gpus_of(self, group: _Group, procs: Mapping[int, Sequence[str]] | None = None) -> tuple[list[str], str]:
        """The GPU / MIG UUIDs the group holds, and where that came from (``kubelet`` or ``nvml``).
        ``procs``: NVML's process table when the caller has just read it."""
        gm = self._gpu_map
        if gm is not None and group.pod is not None and gm.available:
            held = gm.devices_of_pod(group.pod.namespace, group.pod.name)
            if held:
                return sorted(held), "kubelet"
        nvml = self._nvml
        if procs is None:
            procs = nvml.processes() if nvml is not None else {}
        if not procs:
            return [], "nvml"
        uuids = {u for p in group.pids for u in procs.get(p, ())}
        return sorted(uuids), "nvml"

    def _share(self, uuid: str, group: _Group, pod_sm: float | None, util: float | None) -> float | None:
        """The group's share of one GPU: 1 when it holds the GPU alone, else its SM use over the
        GPU's (None when NVML has no per-process utilisation to tell)."""
        # shared when NVML shows another pod's (or a pod-less) process on it...
        holders = self._snapshot.holders.get(uuid)
        if holders and (len(holders) > 1 or group.key not in holders):
            return _ratio(pod_sm, util)
        # ...or the kubelet assigned it to another pod too (time-slicing replicas, or a pod
        # using a GPU it did not request)
        gm = self._gpu_map
        if gm is not None and gm.available:
            pods = {(ns, name) for ns, name, _ in gm.pods_of_device(uuid)}
            if group.pod is not None:
                pods.add((group.pod.namespace, group.pod.name))
            if len(pods) > 1 or (group.pod is None and pods):
                return _ratio(pod_sm, util)
        return 1.0

    def _dcgm_attributes(self, uuids: Sequence[str], t0: int, t1: int) -> dict[str, Any]:
        dcgm = self._dcgm
        if dcgm is None:
            return {}
        windows = [w for w in (dcgm.device_window(u, t0, t1, DCGM_RECORD_FIELDS) for u in uuids) if w is not None]
        out: dict[str, Any] = {}
        for dcgm_field, attribute in DCGM_WINDOW_ATTRIBUTES.items():
            values = [w.mean[dcgm_field] for w in windows if dcgm_field in w.mean]
            if values:
                out[attribute] = sum(values) / len(values)
        return out

    def _cuda_attributes(self, group: _Group, t0: int, t1: int) -> dict[str, Any]:
        cuda = self._cuda
        if cuda is None:
            return {}
        windows = [w for w in (cuda.window(p, t0, t1) for p in sorted(group.pids)) if w is not None]
        if not windows:
            return {}
        return {
            A_CUDA_LAUNCHES: sum(w.launches for w in windows),
            A_CUDA_GRAPH_LAUNCHES: sum(w.graph_launches for w in windows),
            A_CUDA_MEMCPY: sum(w.memcpy_htod_bytes + w.memcpy_dtoh_bytes + w.memcpy_dtod_bytes
                               + w.memcpy_other_bytes for w in windows),
            A_CUDA_SYNC: sum(w.sync_ns for w in windows) / 1e9,
            A_CUDA_SPAN: (max(w.end_unix_nano for w in windows) - min(w.start_unix_nano for w in windows)) / 1e9,
        }

    # ---- process → group ----------------------------------------------------------------------

    def _group_for(self, pid: int, ref: ContainerRef | None, pod: PodInfo | None) -> _Group:
        key = f"pod:{pod.uid}" if pod is not None else _group_key(ref, pid)
        known = self._snapshot.groups.get(key)
        if known is None:
            return _Group(key, pod, frozenset((pid,)))
        if pid in known.pids and known.pod is pod:
            return known  # the refresh's own group (the common case): nothing to build
        return _Group(key, pod, known.pids if pid in known.pids else known.pids | {pid})

    def _remember_served(self, pid: int) -> None:
        if pid == self._last_served:
            return  # already the most recent: most records come from the process before
        with self._lock:
            self._last_served = pid
            if pid in self._served:
                self._served.move_to_end(pid)
                return
            self._served[pid] = None
            while len(self._served) > self.config.max_pids:
                self._served.popitem(last=False)
                self._metrics.inc(PIDS_DROPPED, labels=(("what", "served"),))

    def refresh(self) -> None:
        """Map served, GPU and CUDA processes to their pods, hand the pods' processes to the
        CUDA probe, and account the per-pod metrics. Called every ``refresh_s`` by the join's
        thread (tests call it directly; never from two threads at once). Reads /proc and
        attaches CUDA uprobes, so never on the assembly thread; never raises for a vanished process."""
        nvml_procs = self._nvml.processes() if self._nvml is not None else {}
        cuda_pids = set(self._cuda.pids()) if self._cuda is not None else set()
        with self._lock:
            served = list(self._served)
        candidates = list(dict.fromkeys([*served, *sorted(nvml_procs), *sorted(cuda_pids)]))
        if len(candidates) > self.config.max_pids:
            self._metrics.inc(PIDS_DROPPED, len(candidates) - self.config.max_pids, (("what", "refresh"),))
            candidates = candidates[: self.config.max_pids]
        members: dict[str, set[int]] = {}
        pods: dict[str, PodInfo | None] = {}
        group_of: dict[int, str] = {}
        for pid in candidates:
            ref = self._resolver.resolve(pid)
            if ref is None and not os.path.exists(f"{self.config.proc}/{pid}"):
                continue  # exited
            pod = self._lookup_pod(ref)
            key = f"pod:{pod.uid}" if pod is not None else _group_key(ref, pid)
            members.setdefault(key, set()).add(pid)
            pods.setdefault(key, pod)
            group_of[pid] = key
        groups = {k: _Group(k, pods[k], frozenset(v)) for k, v in members.items()}
        holders: dict[str, set[str]] = {}
        for pid, uuids in nvml_procs.items():
            holder = group_of.get(pid)
            if holder is not None:
                for u in uuids:
                    holders.setdefault(u, set()).add(holder)
        self._snapshot = _Snapshot(group_of, groups, {u: frozenset(k) for u, k in holders.items()})
        self._trace_cuda(groups, set(served), set(nvml_procs), cuda_pids)
        self._account(groups)

    def _lookup_pod(self, ref: ContainerRef | None) -> PodInfo | None:
        if self._pods is None or ref is None:
            return None
        pod = self._pods.by_container(ref.container_id)
        if pod is None and ref.pod_uid is not None:
            pod = self._pods.by_uid(ref.pod_uid)
        return pod

    def _trace_cuda(self, groups: Mapping[str, _Group], served: set[int], gpu_pids: set[int],
                    traced: set[int]) -> None:
        """Hand the CUDA probe every process of a group that served a request or runs on a GPU
        (in vLLM the API server and the engine that launches kernels are separate processes)."""
        cuda = self._cuda
        if cuda is None:
            return
        handed = False
        for g in groups.values():
            if not g.pids & (served | gpu_pids):
                continue
            for pid in sorted(g.pids - traced):
                key = (pid, process_start_time(pid, self.config.proc))
                if key in self._cuda_tried:
                    continue  # refused once (the probe's target bound, an exited process): not again
                self._cuda_tried[key] = None
                while len(self._cuda_tried) > self.config.max_pids:
                    self._cuda_tried.popitem(last=False)
                cuda.add_pid(pid)
                handed = True
        if handed:
            self._metrics.inc(CUDA_TARGETS, len(set(cuda.pids()) - traced))

    # ---- per-pod accounting -------------------------------------------------------------------

    def _account_for(self, pod: PodInfo) -> _PodAccount | None:
        """The pod's account (created on first use). Caller holds the lock."""
        acc = self._accounts.get(pod.uid)
        if acc is None:
            if len(self._accounts) >= self.config.max_pods:
                self._metrics.inc(PODS_DROPPED)
                return None
            attrs = {k: v for k, v in pod.attributes().items() if k.startswith("k8s.")}
            acc = self._accounts[pod.uid] = _PodAccount(attributes=attrs, seen=self._clock())
        else:
            acc.seen = self._clock()
        return acc

    def _add_tokens(self, pod: PodInfo, tokens: int) -> None:
        with self._lock:
            acc = self._account_for(pod)
            if acc is not None:
                acc.tokens += tokens

    def _account(self, groups: Mapping[str, _Group]) -> None:
        """Charge each pod on a GPU the time and energy since the last refresh, times its share."""
        nvml = self._nvml
        now = self._clock()
        wall = self._wall_clock()
        prev = self._last_tick
        self._last_tick = now
        if nvml is None:
            return
        # latest per-(pid, GPU) values NVML holds: memory and SM utilisation
        mem: dict[tuple[int, str], float] = {}
        sm: dict[tuple[int, str], float] = {}
        for pid, p in nvml.process_points():
            uuid = str(p.attributes.get("gpu.uuid", ""))
            if p.name == "hw.gpu.process.memory.usage":
                mem[(pid, uuid)] = p.value
            elif p.name == "hw.gpu.process.utilization":
                sm[(pid, uuid)] = p.value
        # the state over the last refresh period (or, with no sample in it, the one before)
        look_back = int(self.config.refresh_s * 1e9)
        energy_delta: dict[str, float] = {}
        util_now: dict[str, float] = {}
        for dev in nvml.devices():
            w = nvml.device_window(dev.uuid, wall - look_back, wall)
            if w is None:
                continue
            if "utilization.gpu" in w.mean:
                util_now[dev.uuid] = w.mean["utilization.gpu"]
            if "energy.total" in w.max:
                total = w.max["energy.total"]  # a counter: its largest value is its latest
                last = self._last_energy.get(dev.uuid)
                self._last_energy[dev.uuid] = total
                if last is not None and total >= last:
                    energy_delta[dev.uuid] = total - last
            elif "power.draw" in w.mean and prev is not None:
                energy_delta[dev.uuid] = w.mean["power.draw"] * (now - prev)
        for dev in nvml.devices():
            # NVML has no energy for a MIG device: it gets its parent's in proportion to its memory
            if dev.parent_uuid is not None and dev.parent_uuid in energy_delta:
                w_mig = nvml.device_window(dev.uuid, wall - look_back, wall)
                w_parent = nvml.device_window(dev.parent_uuid, wall - look_back, wall)
                part = w_mig.max.get("memory.total") if w_mig is not None else None
                whole = w_parent.max.get("memory.total") if w_parent is not None else None
                if part and whole:
                    energy_delta[dev.uuid] = energy_delta[dev.parent_uuid] * min(1.0, part / whole)
        dt = now - prev if prev is not None else 0.0
        with self._lock:
            for g in groups.values():
                if g.pod is None:
                    continue
                uuids, _ = self._gpus_of(g)
                if not uuids:
                    continue
                acc = self._account_for(g.pod)
                if acc is None:
                    continue
                acc.on_gpu = True
                for u in uuids:
                    pod_sm = [v for (pid, uu), v in sm.items() if uu == u and pid in g.pids]
                    share = self._share(u, g, sum(pod_sm) if pod_sm else None, util_now.get(u))
                    pod_mem = [v for (pid, uu), v in mem.items() if uu == u and pid in g.pids]
                    acc.gauges[u] = (share, sum(pod_mem) if pod_mem else None, now)
                    if share is not None:
                        acc.gpu_seconds += dt * share
                        acc.energy_j += energy_delta.get(u, 0.0) * share
            for uid in [u for u, a in self._accounts.items() if now - a.seen > self.config.pod_retention_s]:
                del self._accounts[uid]
            for acc in self._accounts.values():
                acc.recent.append((now, acc.gpu_seconds, acc.energy_j, acc.tokens))
                while len(acc.recent) > 1 and now - acc.recent[0][0] > self.config.ratio_window_s:
                    acc.recent.popleft()

    def points(self) -> list[MetricPoint]:
        """Per-pod GPU metrics for the exporters (attributes ``k8s.*`` and ``gpu.uuid``; never a pid)."""
        now = self._clock()
        out: list[MetricPoint] = []
        with self._lock:
            for acc in self._accounts.values():
                attrs = acc.attributes
                out.append(POD_TOKENS.point(attrs, acc.tokens))
                if not acc.on_gpu:
                    continue
                out.append(POD_GPU_TIME.point(attrs, acc.gpu_seconds))
                out.append(POD_ENERGY.point(attrs, acc.energy_j))
                for uuid, (share, memory, at) in sorted(acc.gauges.items()):
                    if now - at > self.config.stale_s:
                        continue
                    gattrs = {**attrs, "gpu.uuid": uuid, "hw.id": uuid}
                    if share is not None:
                        out.append(POD_SHARE.point(gattrs, share))
                    if memory is not None:
                        out.append(POD_MEMORY.point(gattrs, memory))
                ratio = _recent_ratio(acc.recent)
                if ratio is not None:
                    out.append(POD_TIME_PER_TOKEN.point(attrs, ratio[0]))
                    out.append(POD_ENERGY_PER_TOKEN.point(attrs, ratio[1]))
        return out

    # ---- helpers ------------------------------------------------------------------------------

    def _mig_aliases(self) -> dict[str, str]:
        """Every MIG UUID NVML knows, as itself and in the R450/R460 ``MIG-GPU-<gpu>/<gi>/<ci>`` form."""
        nvml = self._nvml
        if nvml is None:
            return {}
        out: dict[str, str] = {}
        for d in nvml.devices():
            if d.parent_uuid is not None:
                out[d.uuid] = d.uuid
                out[f"MIG-{d.parent_uuid}/{d.gpu_instance_id}/{d.compute_instance_id}"] = d.uuid
        return out

    def _log_once(self, key: str, msg: str, *, exc_info: bool = False) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, exc_info=exc_info)


def _ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or whole <= 0:
        return None
    return min(1.0, max(0.0, part / whole))


def _recent_ratio(recent: Sequence[tuple[float, float, float, float]]) -> tuple[float, float] | None:
    """(GPU-seconds, joules) per token between the oldest and newest cumulative entries kept;
    None without tokens in between."""
    if len(recent) < 2:
        return None
    first, last = recent[0], recent[-1]
    tokens = last[3] - first[3]
    if tokens <= 0:
        return None
    return (last[1] - first[1]) / tokens, (last[2] - first[2]) / tokens
