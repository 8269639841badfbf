"""CUDA uprobes: per-process launches, memory and synchronize time, aggregated in the kernel.

The kernel side (``cuda.bpf.c``) counts into ``(tgid, time bucket)`` entries of
an LRU hash; nothing is sent per call. This loader

* finds the ``libcuda.so*`` / ``libcudart.so*`` files each target process really
  maps (``/proc/<pid>/maps``, including copies bundled in Python wheels and
  files inside a container's filesystem, through ``/proc/<pid>/root``), and
  attaches uprobes once per distinct file (device + inode), for every process
  (pid = -1; the kernel filters on a target map);
* rescans the targets' maps periodically, so a process that ``dlopen``s CUDA
  after the agent attached is covered;
* reads and deletes completed buckets, converts their monotonic start to
  wall-clock time (in :func:`monotonic_to_unix_ns` and its reverse, nowhere
  else) and keeps a bounded history per process that the join queries by time
  window; a window reaching into buckets not read yet reads those in place, so
  a request that has just ended carries the CUDA calls made for it.

Only this module and ``cuda.bpf.c`` know the kernel side; :class:`CudaBucket`,
:class:`CudaWindow` and :class:`CudaPoint` are plain frozen data.
"""

from __future__ import annotations

import ctypes as ct
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from probes.compile import compile_bpf

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parent
SRC_FILE = PROBE_DIR / "cuda.bpf.c"

# --------------------------------------------------------------------------- layout
# Mirrors of the structs in cuda.h; tests/test_cuda_probe.py checks the sizes
# against the C compiler and against the BPF object's own table types.

CUDA_SYNC_HIST_SLOTS = 32
#: Upper bounds, in seconds, of ``sync_hist`` slots 0..30 (slot 31 is open-ended).
SYNC_BOUNDS_S: tuple[float, ...] = tuple((1 << k) / 1e6 for k in range(CUDA_SYNC_HIST_SLOTS - 1))

CUDA_STAT_BUCKETS_CREATED = 0
CUDA_STAT_BUCKET_FAILED = 1
CUDA_STAT_ALLOCS_TRACKED = 2
CUDA_STAT_ALLOCS_RELEASED = 3
CUDA_STAT_ALLOC_FAILED = 4
CUDA_STAT_FREE_UNTRACKED = 5
CUDA_STAT_CALL_FAILED = 6
CUDA_STAT_MAX = 7


class CudaBucketKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("_pad", ct.c_uint32), ("bucket", ct.c_uint64)]


class CudaBucketValue(ct.Structure):
    _fields_ = [
        ("launches", ct.c_uint64),
        ("graph_launches", ct.c_uint64),
        ("alloc_bytes", ct.c_uint64),
        ("free_bytes", ct.c_uint64),
        ("memcpy_htod_bytes", ct.c_uint64),
        ("memcpy_dtoh_bytes", ct.c_uint64),
        ("memcpy_dtod_bytes", ct.c_uint64),
        ("memcpy_other_bytes", ct.c_uint64),
        ("sync_calls", ct.c_uint64),
        ("sync_ns", ct.c_uint64),
        ("sync_hist", ct.c_uint64 * CUDA_SYNC_HIST_SLOTS),
    ]


class CudaAllocKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("_pad", ct.c_uint32), ("dptr", ct.c_uint64)]


class CudaCall(ct.Structure):
    _fields_ = [
        ("depth", ct.c_uint32),
        ("op", ct.c_uint8),
        ("_pad", ct.c_uint8 * 3),
        ("start_ns", ct.c_uint64),
        ("out_ptr", ct.c_uint64),
        ("size", ct.c_uint64),
    ]


#: C struct name -> ctypes mirror, for the layout test.
LAYOUT: dict[str, type[ct.Structure]] = {
    "cuda_bucket_key": CudaBucketKey,
    "cuda_bucket": CudaBucketValue,
    "cuda_alloc_key": CudaAllocKey,
    "cuda_call": CudaCall,
}

# ---------------------------------------------------------------------------- hooks


@dataclass(frozen=True, slots=True)
class Hook:
    """One API function: the BPF program for its entry, the one for its return
    (or None), and the symbol names it may have (the first is the API name; the
    others are per-thread-default-stream variants, attached where they exist)."""

    fn: str
    ret_fn: str | None
    symbols: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.symbols[0]


def _hook(fn: str, ret_fn: str | None, name: str, *variants: str) -> Hook:
    return Hook(fn, ret_fn, (name, *(name + v for v in variants)))


DRIVER_HOOKS: tuple[Hook, ...] = (
    _hook("drv_launch", None, "cuLaunchKernel", "_ptsz"),
    _hook("drv_launch", None, "cuLaunchKernelEx", "_ptsz"),
    _hook("drv_graph_launch", None, "cuGraphLaunch", "_ptsz"),
    _hook("drv_alloc", "drv_return", "cuMemAlloc_v2"),
    _hook("drv_alloc", "drv_return", "cuMemAllocAsync", "_ptsz"),
    _hook("drv_free", None, "cuMemFree_v2"),
    _hook("drv_free", None, "cuMemFreeAsync", "_ptsz"),
    _hook("drv_copy_htod", None, "cuMemcpyHtoD_v2", "_ptds"),
    _hook("drv_copy_dtoh", None, "cuMemcpyDtoH_v2", "_ptds"),
    _hook("drv_copy_dtod", None, "cuMemcpyDtoD_v2", "_ptds"),
    _hook("drv_copy_htod", None, "cuMemcpyHtoDAsync_v2", "_ptsz"),
    _hook("drv_copy_dtoh", None, "cuMemcpyDtoHAsync_v2", "_ptsz"),
    _hook("drv_copy_dtod", None, "cuMemcpyDtoDAsync_v2", "_ptsz"),
    _hook("drv_sync", "drv_return", "cuStreamSynchronize", "_ptsz"),
    _hook("drv_sync", "drv_return", "cuCtxSynchronize"),
)

# Every runtime hook has the rt_return uretprobe: it closes the per-thread depth
# that keeps the driver calls made inside a runtime call from counting twice.
RUNTIME_HOOKS: tuple[Hook, ...] = (
    _hook("rt_launch", "rt_return", "cudaLaunchKernel", "_ptsz"),
    _hook("rt_launch", "rt_return", "cudaLaunchKernelExC", "_ptsz"),
    _hook("rt_graph_launch", "rt_return", "cudaGraphLaunch", "_ptsz"),
    _hook("rt_malloc", "rt_return", "cudaMalloc"),
    _hook("rt_malloc", "rt_return", "cudaMallocAsync", "_ptsz"),
    _hook("rt_free", "rt_return", "cudaFree"),
    _hook("rt_free", "rt_return", "cudaFreeAsync", "_ptsz"),
    _hook("rt_memcpy", "rt_return", "cudaMemcpy", "_ptds"),
    _hook("rt_memcpy", "rt_return", "cudaMemcpyAsync", "_ptsz"),
    _hook("rt_sync", "rt_return", "cudaStreamSynchronize", "_ptsz"),
    _hook("rt_sync", "rt_return", "cudaDeviceSynchronize"),
)

#: Library kind -> (basename pattern, hooks). The runtime pattern also takes the
#: names auditwheel gives bundled copies (``libcudart-1a2b3c4d.so.11.0``).
LIBRARIES: dict[str, tuple[re.Pattern[str], tuple[Hook, ...]]] = {
    "driver": (re.compile(r"^libcuda\.so(\.\d+)*$"), DRIVER_HOOKS),
    "runtime": (re.compile(r"^libcudart(-[0-9a-f]{8})?\.so(\.\d+)*$"), RUNTIME_HOOKS),
}

# ---------------------------------------------------------------------- public data


@dataclass(frozen=True)
class CudaProbeConfig:
    """Settings of the CUDA probe. Validated once, at construction."""

    bucket_ns: int = 1_000_000_000
    """Length of one aggregation bucket in ns (compiled into the probe as BUCKET_NS)."""
    rescan_s: float = 1.0
    """How often the targets' /proc/<pid>/maps are read again to find CUDA loaded late."""
    poll_s: float = 1.0
    """How often the background thread reads completed buckets."""
    settle_ns: int = 100_000_000
    """A bucket is read this long after it ends, so that updates racing the boundary land."""
    max_pids: int = 1024
    """Target processes at once (BPF target map) and processes whose history is kept."""
    max_buckets: int = 16384
    """Entries of the BPF (pid, bucket) LRU map; evictions are counted."""
    max_allocs: int = 65536
    """Live allocations whose size is remembered (BPF LRU map) so frees count bytes."""
    max_threads: int = 16384
    """Threads with a CUDA call in progress (BPF LRU map)."""
    history_buckets: int = 600
    """Completed buckets kept per process for :meth:`CudaProbe.window`."""
    alloc_audit_s: float = 30.0
    """How often the allocation map is walked to drop exited processes and count evictions."""
    max_attach_attempts: int = 3
    """Attempts to attach one library file before giving up on it."""
    live_buckets: int = 4
    """Buckets one :meth:`CudaProbe.window` call reads in place from the kernel (those
    :meth:`CudaProbe.poll` has not read yet), beyond the ones the thread leaves unread by
    design (``settle_ns`` + ``poll_s``, in buckets). A window over more unread buckets (the
    thread lags) reads the newest, and is counted in ``infersight.cuda.window.truncated``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(f"CudaProbeConfig.{f.name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True)
class CudaBucket:
    """CUDA activity of one process in one time bucket ``[start, start + bucket_ns)``.

    Bytes are bytes; ``sync_hist[k]`` counts synchronize waits of
    ``2**(k-1) <= us < 2**k`` (slot 0: under 1 us; the last slot: all longer).
    ``memcpy_other_bytes`` are host-to-host copies and ``cudaMemcpyDefault``
    copies, whose direction the call does not say.
    """

    pid: int
    start_unix_nano: int
    launches: int
    graph_launches: int
    alloc_bytes: int
    free_bytes: int
    memcpy_htod_bytes: int
    memcpy_dtoh_bytes: int
    memcpy_dtod_bytes: int
    sync_calls: int
    sync_ns: int
    sync_hist: tuple[int, ...]
    memcpy_other_bytes: int = 0


# The counters that add up across buckets (everything but pid, start and the histogram).
_SUMMED = (
    "launches",
    "graph_launches",
    "alloc_bytes",
    "free_bytes",
    "memcpy_htod_bytes",
    "memcpy_dtoh_bytes",
    "memcpy_dtod_bytes",
    "memcpy_other_bytes",
    "sync_calls",
    "sync_ns",
)


@dataclass(frozen=True, slots=True)
class CudaWindow:
    """Sums over the buckets of one process that overlap a time window.

    ``start_unix_nano`` / ``end_unix_nano`` span the buckets summed, which may
    reach a bucket beyond the window asked for on either side.
    """

    pid: int
    start_unix_nano: int
    end_unix_nano: int
    buckets: int
    launches: int = 0
    graph_launches: int = 0
    alloc_bytes: int = 0
    free_bytes: int = 0
    memcpy_htod_bytes: int = 0
    memcpy_dtoh_bytes: int = 0
    memcpy_dtod_bytes: int = 0
    memcpy_other_bytes: int = 0
    sync_calls: int = 0
    sync_ns: int = 0
    sync_hist: tuple[int, ...] = (0,) * CUDA_SYNC_HIST_SLOTS


@dataclass(frozen=True, slots=True)
class CudaPoint:
    """One cumulative counter of one process; fits ``agent.export.instruments.MetricPointLike``.

    ``attributes`` carry ``process.pid`` (the join maps it to ``k8s.*``; the
    exporters never make it a label) and, for copies, ``gpu.cuda.memcpy.direction``.
    """

    name: str
    prom_name: str
    unit: str
    kind: str  # always "counter"
    help: str
    attributes: Mapping[str, Any]
    value: float
    start_time_unix_nano: int


@dataclass(frozen=True, slots=True)
class CudaMetric:
    """How one bucket counter is exported: the metric set is data, not code."""

    field: str
    name: str
    prom_name: str
    unit: str
    help: str
    attributes: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0


_DIRECTION = "gpu.cuda.memcpy.direction"
_MEMCPY_HELP = "Bytes copied by CUDA memcpy calls, by direction"

#: The per-process counters :meth:`CudaProbe.points` exports. The synchronize
#: histogram is not among them (collector sources export counters and gauges);
#: it is in every :class:`CudaBucket` and :class:`CudaWindow`.
CUDA_METRICS: tuple[CudaMetric, ...] = (
    CudaMetric("launches", "gpu.cuda.kernel.launch.calls", "gpu_cuda_kernel_launch_calls_total", "{call}",
               "CUDA kernel launches (cuLaunchKernel*, cudaLaunchKernel*)"),
    CudaMetric("graph_launches", "gpu.cuda.graph.launch.calls", "gpu_cuda_graph_launch_calls_total", "{call}",
               "CUDA graph launches (cuGraphLaunch, cudaGraphLaunch)"),
    CudaMetric("alloc_bytes", "gpu.cuda.memory.allocated", "gpu_cuda_memory_allocated_bytes_total", "By",
               "Bytes of successful CUDA device allocations"),
    CudaMetric("free_bytes", "gpu.cuda.memory.freed", "gpu_cuda_memory_freed_bytes_total", "By",
               "Bytes of CUDA device memory freed (allocations seen by the probe)"),
    CudaMetric("memcpy_htod_bytes", "gpu.cuda.memcpy.bytes", "gpu_cuda_memcpy_bytes_total", "By", _MEMCPY_HELP,
               ((_DIRECTION, "host_to_device"),)),
    CudaMetric("memcpy_dtoh_bytes", "gpu.cuda.memcpy.bytes", "gpu_cuda_memcpy_bytes_total", "By", _MEMCPY_HELP,
               ((_DIRECTION, "device_to_host"),)),
    CudaMetric("memcpy_dtod_bytes", "gpu.cuda.memcpy.bytes", "gpu_cuda_memcpy_bytes_total", "By", _MEMCPY_HELP,
               ((_DIRECTION, "device_to_device"),)),
    CudaMetric("memcpy_other_bytes", "gpu.cuda.memcpy.bytes", "gpu_cuda_memcpy_bytes_total", "By", _MEMCPY_HELP,
               ((_DIRECTION, "other"),)),
    CudaMetric("sync_calls", "gpu.cuda.sync.calls", "gpu_cuda_sync_calls_total", "{call}",
               "CUDA stream, context and device synchronize calls"),
    CudaMetric("sync_ns", "gpu.cuda.sync.duration", "gpu_cuda_sync_duration_seconds_total", "s",
               "Time spent waiting in CUDA synchronize calls", scale=1e-9),
)


@dataclass(frozen=True, slots=True)
class CudaLibrary:
    """A library file the probe attached to (or tried to)."""

    kind: str  # "driver" or "runtime"
    dev: str  # major:minor as /proc/<pid>/maps writes it
    inode: int
    path: str  # as the first process that mapped it sees it
    attached: tuple[str, ...]  # API names hooked
    missing: tuple[str, ...]  # API names the file does not export
    failed: tuple[str, ...]  # API names whose attach failed


@dataclass(frozen=True, slots=True)
class MappedLibrary:
    """A CUDA library in one process's address space, from /proc/<pid>/maps."""

    kind: str
    dev: str
    inode: int
    path: str


def monotonic_to_unix_ns(mono_ns: int) -> int:
    """Wall-clock ns for a CLOCK_MONOTONIC ns value (``bpf_ktime_get_ns``'s clock).

    With :func:`unix_to_monotonic_ns`, the one place this probe converts kernel
    time; the offset is read fresh on each call, so a stepped wall clock is followed.
    """
    return mono_ns + (time.time_ns() - time.monotonic_ns())


def unix_to_monotonic_ns(unix_ns: int) -> int:
    """The CLOCK_MONOTONIC ns value of a wall-clock ns value: :func:`monotonic_to_unix_ns` reversed."""
    return unix_ns - (time.time_ns() - time.monotonic_ns())


def parse_maps(text: str) -> list[MappedLibrary]:
    """CUDA libraries mapped, from the text of /proc/<pid>/maps, one per (dev, inode).

    Pure; never raises on odd lines (they are skipped).
    """
    found: dict[tuple[str, int], MappedLibrary] = {}
    # Only lines naming a CUDA library are split: a PyTorch process maps thousands of files.
    for line in (ln for ln in text.splitlines() if "/libcud" in ln):
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5]
        if path.endswith(" (deleted)"):
            continue  # replaced on disk; the new file is what a new process maps
        base = path.rsplit("/", 1)[-1]
        for kind, (pattern, _) in LIBRARIES.items():
            if pattern.match(base):
                try:
                    inode = int(parts[4])
                except ValueError:
                    break
                if inode:
                    found.setdefault((parts[3], inode), MappedLibrary(kind, parts[3], inode, path))
                break
    return list(found.values())


# ---------------------------------------------------------------------- the probe


#: Kernel statistics that are losses, and the self-metric each is counted as.
_KERNEL_LOSSES: dict[int, tuple[str, tuple[tuple[str, str], ...]]] = {
    CUDA_STAT_BUCKET_FAILED: ("infersight.cuda.updates.lost", (("reason", "bucket_map_full"),)),
    CUDA_STAT_ALLOC_FAILED: ("infersight.cuda.updates.lost", (("reason", "allocation_untracked"),)),
    CUDA_STAT_CALL_FAILED: ("infersight.cuda.updates.lost", (("reason", "thread_map_full"),)),
    CUDA_STAT_FREE_UNTRACKED: ("infersight.cuda.frees.untracked", ()),
}


class _EvictionEstimate:
    """Evictions from an LRU map, derived: created - removed - present.

    Reads race with the kernel, so each estimate is a lower bound; the counter
    follows the largest seen, and only ever goes up.
    """

    def __init__(self) -> None:
        self.counted = 0

    def update(self, created: int, removed: int, present: int) -> int:
        """Return how many new evictions to count."""
        estimate = created - removed - present
        if estimate <= self.counted:
            return 0
        delta = estimate - self.counted
        self.counted = estimate
        return delta


@dataclass
class _Totals:
    start_unix_nano: int
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMMED, 0))


class CudaProbe:
    """Counts CUDA driver and runtime API use of target processes.

    Construction compiles and loads the BPF program; when that fails (no BCC,
    no uprobes, an old kernel), the probe is disabled: it logs once, counts
    ``infersight.cuda.probe.load.failures`` and every method becomes a no-op.
    No method raises for a kernel or /proc failure.

    Threading: every public method may be called from any thread; BPF map and
    attach operations are serialised by one lock. :meth:`start` runs a daemon
    thread that rescans the targets' maps every ``rescan_s`` and calls
    :meth:`poll` every ``poll_s``.
    """

    def __init__(
        self,
        config: CudaProbeConfig = CudaProbeConfig(),
        *,
        metrics: SelfMetrics = SELF_METRICS,
        proc: str = "/proc",
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._proc = proc
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pids: dict[int, int] = {}  # target pid -> start time (detects pid reuse)
        self._libraries: dict[tuple[str, int], CudaLibrary] = {}
        self._attempts: dict[tuple[str, int], int] = {}
        self._pid_libraries: dict[int, set[tuple[str, int]]] = {}
        self._history: OrderedDict[int, deque[CudaBucket]] = OrderedDict()
        self._totals: OrderedDict[int, _Totals] = OrderedDict()
        self._stats_seen = [0] * CUDA_STAT_MAX
        self._buckets_read = 0
        self._read_below = 0  # every bucket of a lower index has been through poll()
        lag_ns = config.settle_ns + int(config.poll_s * 1e9)
        self._live_cap = config.live_buckets + -(-lag_ns // config.bucket_ns)
        self._allocs_purged = 0
        self._bucket_evictions = _EvictionEstimate()
        self._alloc_evictions = _EvictionEstimate()
        self._last_audit = time.monotonic()
        self._logged: set[str] = set()
        self._describe_metrics()
        self._bpf: Any = None
        if not self.uprobes_supported():
            metrics.inc("infersight.cuda.probe.load.failures")
            self._log_once("load", "CUDA probe disabled: this kernel offers no uprobes (CONFIG_UPROBE_EVENTS)")
            return
        try:
            self._bpf = self._load()
        except Exception as exc:  # BCC raises bare Exception for compile/load errors
            metrics.inc("infersight.cuda.probe.load.failures")
            self._log_once("load", "CUDA probe disabled: loading %s failed: %s", SRC_FILE, exc)

    # ------------------------------------------------------------------ lifecycle

    @property
    def enabled(self) -> bool:
        """True when the BPF program is loaded."""
        return self._bpf is not None

    @staticmethod
    def uprobes_supported() -> bool:
        """Feature test: does this kernel offer uprobes (perf PMU or tracefs)?"""
        return Path("/sys/bus/event_source/devices/uprobe/type").exists() or any(
            Path(p).exists() for p in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events")
        )

    def _load(self) -> Any:
        c = self.config
        cflags = [
            f"-I{PROBE_DIR}",
            f"-DBUCKET_NS={c.bucket_ns}ULL",
            f"-DMAX_PIDS={c.max_pids}",
            f"-DMAX_BUCKETS={c.max_buckets}",
            f"-DMAX_ALLOCS={c.max_allocs}",
            f"-DMAX_THREADS={c.max_threads}",
        ]
        bpf = compile_bpf(src_file=str(SRC_FILE).encode(), cflags=cflags)
        # Our ctypes mirrors are the table types, so the layout contract is used, not just tested.
        self._targets = bpf.get_table(b"targets", ct.c_uint32, ct.c_uint8)
        self._buckets = bpf.get_table(b"buckets", CudaBucketKey, CudaBucketValue)
        self._allocs = bpf.get_table(b"allocs", CudaAllocKey, ct.c_uint64)
        self._stats = bpf.get_table(b"stats", ct.c_uint32, ct.c_uint64)
        return bpf

    def start(self) -> None:
        """Start the background thread (rescan + poll). Idempotent."""
        if not self.enabled or (self._thread and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cuda-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, read every bucket left (the current ones too) and detach.

        Detaching takes seconds (the kernel unregisters each uprobe in turn; about
        0.1 s per probe here), outside the lock: readers are not held up. After
        stop() the history stays readable; the probe cannot be started again.
        """
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            bpf = self._bpf
            if bpf is None:
                return
            self.poll(flush=True)
            self._bpf = None
        try:
            bpf.cleanup()
        except Exception as exc:
            self._log_once("cleanup", "CUDA probe detach failed: %s", exc)

    def _run(self) -> None:
        c = self.config
        next_scan = next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_scan:
                    self.rescan()
                    next_scan = now + c.rescan_s
                if now >= next_poll:
                    self.poll()
                    next_poll = now + c.poll_s
            except Exception as exc:  # a bug here must not kill the agent; it shows in the metric
                self._metrics.inc("infersight.cuda.thread.errors")
                self._log_once("thread", "CUDA probe thread error: %r", exc)
            self._stop.wait(max(0.01, min(next_scan, next_poll) - time.monotonic()))

    # -------------------------------------------------------------------- targets

    def add_pid(self, pid: int) -> None:
        """Count process ``pid`` from now on and attach to the CUDA libraries it maps.

        Scans its maps at once (attaching takes tens of ms per library); later
        loads are found by the background rescan. A pid that does not exist is ignored.
        """
        with self._lock:
            if self._bpf is None or pid in self._pids:
                return
            view = self._read_pid(pid)
            if view is None:
                return
            if len(self._pids) >= self.config.max_pids:
                self._metrics.inc("infersight.cuda.targets.rejected")
                self._log_once("targets", "CUDA probe: more than %d target processes; pid %d not traced",
                               self.config.max_pids, pid)
                return
            try:
                self._targets[ct.c_uint32(pid)] = ct.c_uint8(1)
            except Exception as exc:
                self._metrics.inc("infersight.cuda.targets.rejected")
                self._log_once("targets-map", "CUDA probe: target map update failed: %s", exc)
                return
            self._pids[pid] = view[0]
            self._attach_mapped(pid, view[1])

    def remove_pid(self, pid: int) -> None:
        """Stop counting ``pid``. Its buckets already counted stay readable."""
        with self._lock:
            self._forget_pid(pid)

    def _forget_pid(self, pid: int) -> None:
        if self._pids.pop(pid, None) is None:
            return
        self._pid_libraries.pop(pid, None)
        if self._bpf is not None:
            try:
                del self._targets[ct.c_uint32(pid)]
            except KeyError:
                pass

    def pids(self) -> list[int]:
        """Target pids."""
        with self._lock:
            return sorted(self._pids)

    def libraries(self, pid: int | None = None) -> list[CudaLibrary]:
        """Library files attached to (all, or those ``pid`` maps as of its last scan)."""
        with self._lock:
            if pid is None:
                return list(self._libraries.values())
            keys = self._pid_libraries.get(pid, set())
            return [self._libraries[k] for k in keys if k in self._libraries]

    # ---------------------------------------------------------------- discovery

    def rescan(self) -> None:
        """Read every target's maps again and attach libraries not seen before.

        A target that has exited (its /proc entry gone, a zombie, or the pid
        reused by a process with another start time) leaves the target map, so
        that a reused pid is not counted; its history stays. /proc is read
        outside the lock.
        """
        with self._lock:
            targets = dict(self._pids)
        for pid, start in targets.items():
            view = self._read_pid(pid)
            with self._lock:
                if self._bpf is None:
                    return  # stopped meanwhile
                if pid not in self._pids:
                    continue  # removed meanwhile
                if view is None or view[0] != start:
                    self._forget_pid(pid)
                elif view[1]:
                    self._attach_mapped(pid, view[1])

    def _read_pid(self, pid: int) -> tuple[int, list[MappedLibrary]] | None:
        """Start time (clock ticks after boot) and CUDA libraries of ``pid``; None if it has exited.

        A /proc read failing for another reason (EACCES) is counted and logged
        once, and reads as "alive, no libraries" so the pid is kept.
        """
        base = Path(self._proc, str(pid))
        try:
            stat = (base / "stat").read_text(errors="replace")
            maps = (base / "maps").read_text(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError as exc:
            self._metrics.inc("infersight.cuda.scan.failures")
            self._log_once(f"proc-{exc.errno}", "CUDA probe: reading /proc of pid %d failed: %s", pid, exc)
            return (self._pids.get(pid) or 0), []
        # stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so split after the last ')'.
        fields_after_comm = stat.rpartition(")")[2].split()
        if not fields_after_comm or fields_after_comm[0] == "Z":
            return None
        try:
            start = int(fields_after_comm[19])  # field 22, starttime
        except (IndexError, ValueError):
            start = 0
        return start, parse_maps(maps)

    def _attach_mapped(self, pid: int, libs: list[MappedLibrary]) -> None:
        """Attach the libraries of ``pid`` not attached yet (call with the lock held)."""
        seen = self._pid_libraries.setdefault(pid, set())
        for lib in libs:
            key = (lib.dev, lib.inode)
            if key not in self._libraries and self._attempts.get(key, 0) < self.config.max_attach_attempts:
                self._attach_library(pid, lib)
            if key in self._libraries:
                seen.add(key)

    def _attach_library(self, pid: int, lib: MappedLibrary) -> None:
        """Attach every hook of one library file; count what it lacks and what fails."""
        from bcc import BPF

        key = (lib.dev, lib.inode)
        labels = (("library", lib.kind),)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        # The path as the process sees it, through its root: works for a file
        # inside a container's mount namespace that the agent's namespace lacks.
        path = f"{self._proc}/{pid}/root{lib.path}"
        _, hooks = LIBRARIES[lib.kind]
        try:
            symbols = {
                name.decode(): addr
                for name, addr in BPF.get_user_functions_and_addresses(path.encode(), rb"^cu")
            }
        except Exception as exc:
            symbols, error = {}, str(exc)
        else:
            error = "none of the hooked functions is exported"
        if not any(sym in symbols for hook in hooks for sym in hook.symbols):
            # Not a CUDA library after all (or unreadable): a failure, not N missing symbols.
            self._metrics.inc("infersight.cuda.attach.failures", labels=labels)
            self._log_once(f"symbols-{lib.kind}", "CUDA probe: cannot use %s: %s", path, error)
            return
        attached: list[str] = []
        missing: list[str] = []
        failed: list[str] = []
        done_addrs: set[int] = set()
        for hook in hooks:
            present = [s for s in hook.symbols if s in symbols]
            if not present:
                missing.append(hook.name)
                continue
            ok = False
            for sym in present:
                if symbols[sym] in done_addrs:
                    continue  # an alias of a symbol already hooked: attaching again would count twice
                if self._attach_symbol(path, sym, hook):
                    done_addrs.add(symbols[sym])
                    ok = True
            (attached if ok else failed).append(hook.name)
        if missing:
            self._metrics.inc("infersight.cuda.symbols.missing", len(missing), labels)
        if failed:
            self._metrics.inc("infersight.cuda.attach.failures", len(failed), labels)
        if not attached:
            return  # nothing hooked: retried on a later scan, up to max_attach_attempts
        self._metrics.inc("infersight.cuda.libraries.attached", labels=labels)
        self._libraries[key] = CudaLibrary(
            lib.kind, lib.dev, lib.inode, lib.path, tuple(attached), tuple(missing), tuple(failed)
        )
        log.info("CUDA probe: attached %d hooks to %s (%s), %d missing", len(attached), lib.path, lib.kind,
                 len(missing))

    def _attach_symbol(self, path: str, sym: str, hook: Hook) -> bool:
        bpf = self._bpf
        bpath, bsym = path.encode(), sym.encode()
        # The uretprobe goes first: an entry without its return would leave the
        # thread's runtime depth open and silence its driver calls for good.
        try:
            if hook.ret_fn:
                bpf.attach_uretprobe(name=bpath, sym=bsym, fn_name=hook.ret_fn.encode(), pid=-1)
        except Exception as exc:
            self._log_once(f"attach-{sym}", "CUDA probe: uretprobe %s in %s failed: %s", sym, path, exc)
            return False
        try:
            bpf.attach_uprobe(name=bpath, sym=bsym, fn_name=hook.fn.encode(), pid=-1)
        except Exception as exc:
            self._log_once(f"attach-{sym}", "CUDA probe: uprobe %s in %s failed: %s", sym, path, exc)
            if hook.ret_fn:
                try:
                    bpf.detach_uretprobe(name=bpath, sym=bsym, pid=-1)
                except Exception:
                    pass  # already counted as this hook's failure
            return False
        return True

    # ------------------------------------------------------------------- reading

    def poll(self, *, flush: bool = False) -> list[CudaBucket]:
        """Read and delete completed buckets (all buckets with ``flush``), oldest first.

        Completed means ended at least ``settle_ns`` ago. The buckets also go
        into the per-process history that :meth:`window` and :meth:`points` read.
        Every ``alloc_audit_s`` (and on ``flush``) the allocation map is audited too.
        """
        c = self.config
        with self._lock:
            if self._bpf is None:
                return []
            stats = self._read_stats()  # before the walk, so evictions are never overestimated
            limit = (time.monotonic_ns() - c.settle_ns) // c.bucket_ns
            present = 0
            done: list[tuple[CudaBucketKey, CudaBucketValue]] = []
            for k, v in self._buckets.items():
                if flush or k.bucket < limit:
                    done.append((k, v))
                else:
                    present += 1
            for k, _ in done:
                try:
                    del self._buckets[k]
                except KeyError:
                    pass  # evicted meanwhile; we have its values
            self._buckets_read += len(done)
            self._read_below = max(self._read_below, limit)
            out = [self._to_bucket(k, v) for k, v in sorted(done, key=lambda kv: (kv[0].bucket, kv[0].tgid))]
            for b in out:
                self._remember(b)
            self._count_stats(stats)
            evicted = self._bucket_evictions.update(stats[CUDA_STAT_BUCKETS_CREATED], self._buckets_read, present)
            if evicted:
                self._metrics.inc("infersight.cuda.map.evictions", evicted, (("map", "buckets"),))
            if flush or time.monotonic() - self._last_audit >= c.alloc_audit_s:
                self._audit_allocs()
            return out

    def _to_bucket(self, k: CudaBucketKey, v: CudaBucketValue) -> CudaBucket:
        return CudaBucket(
            pid=k.tgid,
            start_unix_nano=monotonic_to_unix_ns(k.bucket * self.config.bucket_ns),
            launches=v.launches,
            graph_launches=v.graph_launches,
            alloc_bytes=v.alloc_bytes,
            free_bytes=v.free_bytes,
            memcpy_htod_bytes=v.memcpy_htod_bytes,
            memcpy_dtoh_bytes=v.memcpy_dtoh_bytes,
            memcpy_dtod_bytes=v.memcpy_dtod_bytes,
            sync_calls=v.sync_calls,
            sync_ns=v.sync_ns,
            sync_hist=tuple(v.sync_hist),
            memcpy_other_bytes=v.memcpy_other_bytes,
        )

    def _read_stats(self) -> list[int]:
        out = [0] * CUDA_STAT_MAX
        for i in range(CUDA_STAT_MAX):
            try:
                out[i] = sum(self._stats[ct.c_uint32(i)])  # per-CPU values
            except KeyError:
                pass
        return out

    def _count_stats(self, stats: list[int]) -> None:
        """Mirror the kernel's own loss counters into the self-metrics, by delta."""
        for idx, (name, labels) in _KERNEL_LOSSES.items():
            delta = stats[idx] - self._stats_seen[idx]
            if delta > 0:
                self._metrics.inc(name, delta, labels)
        self._stats_seen = stats

    def _audit_allocs(self) -> None:
        """Drop allocation entries of processes no longer traced; count evictions."""
        self._last_audit = time.monotonic()
        created = self._read_stats()[CUDA_STAT_ALLOCS_TRACKED]
        present = 0
        stale: list[CudaAllocKey] = []
        for k in self._allocs.keys():
            if k.tgid in self._pids:
                present += 1
            else:
                stale.append(k)
        for k in stale:
            try:
                del self._allocs[k]
                self._allocs_purged += 1
            except KeyError:
                pass
        released = self._read_stats()[CUDA_STAT_ALLOCS_RELEASED]  # after the walk: a lower bound again
        evicted = self._alloc_evictions.update(created, released + self._allocs_purged, present)
        if evicted:
            self._metrics.inc("infersight.cuda.map.evictions", evicted, (("map", "allocations"),))

    def _remember(self, b: CudaBucket) -> None:
        hist = self._history.get(b.pid)
        if hist is None:
            if len(self._history) >= self.config.max_pids:
                # history and totals hold the same pids, in the same order
                oldest, _ = self._history.popitem(last=False)
                self._totals.pop(oldest, None)
                self._metrics.inc("infersight.cuda.history.evicted", labels=(("what", "process"),))
            hist = self._history[b.pid] = deque(maxlen=self.config.history_buckets)
        else:
            self._history.move_to_end(b.pid)
        if len(hist) == hist.maxlen:
            self._metrics.inc("infersight.cuda.history.evicted", labels=(("what", "bucket"),))
        hist.append(b)
        totals = self._totals.get(b.pid)
        if totals is None:
            totals = self._totals[b.pid] = _Totals(start_unix_nano=b.start_unix_nano)
        else:
            self._totals.move_to_end(b.pid)
        for name in _SUMMED:
            totals.sums[name] += getattr(b, name)

    def history(self, pid: int) -> list[CudaBucket]:
        """Completed buckets kept for ``pid``, oldest first."""
        with self._lock:
            return list(self._history.get(pid, ()))

    def window(self, pid: int, t0_ns: int, t1_ns: int) -> CudaWindow | None:
        """Sums over ``pid``'s buckets that overlap ``[t0_ns, t1_ns]`` (wall clock).

        Buckets :meth:`poll` has read come from the history. Those it has not
        read yet (the current bucket, and those still settling) are read in place
        from the kernel, without deleting them: a window that ends now counts the
        CUDA calls made up to now, so a request answered within one bucket, as a
        real server's usually is, still carries the work done for it. Per call, at
        most ``live_buckets`` more than the thread leaves unread by design are read
        so (the newest). None when ``pid`` has no bucket overlapping the window.
        """
        with self._lock:
            picked = [
                b for b in self._history.get(pid, ())
                if b.start_unix_nano <= t1_ns and b.start_unix_nano + self.config.bucket_ns > t0_ns
            ]
            picked.extend(self._unread(pid, t0_ns, t1_ns))
        return summarise(pid, picked, self.config.bucket_ns)

    def _unread(self, pid: int, t0_ns: int, t1_ns: int) -> list[CudaBucket]:
        """``pid``'s buckets overlapping the window that are still in the kernel, read in place.

        Only indexes ``poll`` has not passed are looked up, so nothing counts twice: a bucket
        polled early (``flush``) and updated since has a new kernel entry holding only the
        calls made after the poll. Caller holds the lock.
        """
        if self._bpf is None:
            return []
        c = self.config
        first = max(unix_to_monotonic_ns(t0_ns) // c.bucket_ns, self._read_below)
        last = unix_to_monotonic_ns(t1_ns) // c.bucket_ns
        if last < first:
            return []
        if last - first >= self._live_cap:
            first = last - self._live_cap + 1
            self._metrics.inc("infersight.cuda.window.truncated")
        key = CudaBucketKey(tgid=pid)
        out = []
        for index in range(first, last + 1):
            key.bucket = index
            try:
                value = self._buckets[key]
            except KeyError:
                continue  # no CUDA call of pid in that bucket
            out.append(self._to_bucket(key, value))
        return out

    def points(self) -> list[CudaPoint]:
        """Cumulative per-process counters (:data:`CUDA_METRICS`) since each process's first bucket.

        Several processes may map to the same labels once the join swaps
        ``process.pid`` for ``k8s.*``: a consumer sums those points.
        """
        with self._lock:
            items = [(pid, t.start_unix_nano, dict(t.sums)) for pid, t in self._totals.items()]
        return [
            CudaPoint(m.name, m.prom_name, m.unit, "counter", m.help, {"process.pid": pid, **dict(m.attributes)},
                      sums[m.field] * m.scale if m.scale != 1.0 else sums[m.field], start)
            for pid, start, sums in items
            for m in CUDA_METRICS
        ]

    # ------------------------------------------------------------------- helpers

    def _describe_metrics(self) -> None:
        m = self._metrics
        m.describe("infersight.cuda.libraries.attached", "counter", "CUDA library files the probe attached to")
        m.describe("infersight.cuda.symbols.missing", "counter",
                   "CUDA API functions absent from an attached library (older or newer CUDA)")
        m.describe("infersight.cuda.attach.failures", "counter", "CUDA uprobe attach failures")
        m.describe("infersight.cuda.map.evictions", "counter",
                   "entries evicted from the CUDA probe's LRU maps before user space read them")
        m.describe("infersight.cuda.history.evicted", "counter", "CUDA buckets or processes dropped from history")
        m.describe("infersight.cuda.updates.lost", "counter", "CUDA counter updates the kernel could not store")
        m.describe("infersight.cuda.frees.untracked", "counter",
                   "CUDA frees of memory allocated before attach or evicted from the allocation map")
        m.describe("infersight.cuda.targets.rejected", "counter", "processes not traced: target map full")
        m.describe("infersight.cuda.scan.failures", "counter", "reads of a target's /proc entry that failed")
        m.describe("infersight.cuda.probe.load.failures", "counter", "CUDA probe not loaded (no uprobes, BPF error)")
        m.describe("infersight.cuda.thread.errors", "counter", "unexpected errors in the CUDA probe's thread")
        m.describe("infersight.cuda.window.truncated", "counter",
                   "windows that read only their newest unread buckets in place (the probe's thread lags)")

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)


def summarise(pid: int, buckets: Iterable[CudaBucket], bucket_ns: int) -> CudaWindow | None:
    """Sum buckets of one process into a window. Pure; None for no buckets."""
    picked = list(buckets)
    if not picked:
        return None
    if len(picked) == 1:  # the common window of a short request: nothing to add
        only = picked[0]
        sums = {name: getattr(only, name) for name in _SUMMED}
        hist = only.sync_hist
    else:
        sums = {name: sum(getattr(b, name) for b in picked) for name in _SUMMED}
        hist = tuple(sum(col) for col in zip(*(b.sync_hist for b in picked), strict=True))
    return CudaWindow(
        pid=pid,
        start_unix_nano=min(b.start_unix_nano for b in picked),
        end_unix_nano=max(b.start_unix_nano for b in picked) + bucket_ns,
        buckets=len(picked),
        sync_hist=hist,
        **sums,
    )
