"""GPU state from NVML: devices (MIG included), samples, per-process use, XID events.

:class:`NvmlCollector` samples every GPU on its own thread into bounded,
time-indexed histories (:mod:`collectors.history`). The join asks
:meth:`NvmlCollector.device_window` / :meth:`NvmlCollector.process_window` what
a GPU or a process did during a request; the exporters read
:meth:`NvmlCollector.points`.

The metric set is data: ``collectors/gpu_metrics.csv`` maps each sampled field
to an OpenTelemetry name, kind, unit, scale and help (as dcgm-exporter's
``default-counters.csv`` does). Prometheus names are derived from them by
:func:`prometheus_name`.

Loading NVML: pynvml opens ``CDLL("libnvidia-ml.so.1")`` once per process.
With ``library_path`` (the GPU operator's driver root, for instance
``/run/nvidia/driver/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1``, or a test's
fake) the collector first opens that file with ``ctypes.CDLL``; the dynamic
loader then answers pynvml's soname lookup with the already-loaded library.
Because the library stays loaded for the life of the process, the first path
wins; a later collector with another path gets the first library.

Degradation: a missing library, an unloaded driver, or any NVML call failing
with ``NVML_ERROR_DRIVER_NOT_LOADED`` / ``UNINITIALIZED`` /
``LIB_RM_VERSION_MISMATCH`` turns collection off: ``infersight.collector.up``
(label ``source=nvml``) drops to 0, one line is logged, and init is retried
with exponential backoff (``retry_initial_s`` doubling to ``retry_max_s``).
A lost GPU (``NVML_ERROR_GPU_IS_LOST``, ``RESET_REQUIRED``, or an XID in
``lost_xids``, 79 by default: "GPU has fallen off the bus") turns off that GPU
only (``infersight.gpu.up`` with ``gpu.uuid``), with its own backoff. Nothing
here raises into the caller, and :meth:`NvmlCollector.points` omits any value
older than ``stale_periods`` sample periods, so a stalled source goes quiet
rather than repeating its last value.

Threads: ``start()`` runs a sampling thread and, when ``events`` is on, an
event thread blocked in ``nvmlEventSetWait_v2`` with a short timeout. Every
public method is thread-safe and returns without I/O except
:meth:`NvmlCollector.sample_now`, which calls NVML in the caller's thread.
"""

from __future__ import annotations

import csv
import ctypes
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import pynvml

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from collectors.history import History, WindowStats

log = logging.getLogger(__name__)

METRICS_CSV = Path(__file__).with_name("gpu_metrics.csv")

COLLECTOR_UP = "infersight.collector.up"
GPU_UP = "infersight.gpu.up"
UNSUPPORTED = "infersight.gpu.fields.unsupported"
NVML_ERRORS = "infersight.nvml.errors"
RETRIES = "infersight.collector.retries"
PROCESSES_DROPPED = "infersight.gpu.processes.dropped"
XID_CODES_CAPPED = "infersight.gpu.xid.codes.capped"

#: NVML's "no MIG placement" value in process info and event data.
NO_INSTANCE = 0xFFFFFFFF
#: what processes() answers with no current scan: an empty table that cannot be changed
_NO_PROCESSES: Mapping[int, tuple[str, ...]] = MappingProxyType({})

# Errors that mean NVML itself is unusable: collection goes off and init is retried.
_FATAL = frozenset({
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
})
# Errors that mean one GPU is gone until it is reset.
_LOST = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})
_UNSUPPORTED = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})


# --------------------------------------------------------------------------- metric set


_UNIT_SUFFIX = {
    "1": "ratio",
    "By": "bytes",
    "By/s": "bytes_per_second",
    "W": "watts",
    "J": "joules",
    "Hz": "hertz",
    "Cel": "celsius",
    "s": "seconds",
    "ms": "milliseconds",
    "%": "percent",
}


def prometheus_name(otel_name: str, unit: str, kind: str) -> str:
    """The Prometheus name for an OpenTelemetry metric, in base units.

    Dots and other invalid characters become ``_``; the unit adds its suffix
    (``1`` → ``_ratio``, ``By`` → ``_bytes``, ``W`` → ``_watts``, ``J`` →
    ``_joules``, ``Hz`` → ``_hertz``, ``Cel`` → ``_celsius``; an annotation
    such as ``{error}`` adds nothing) unless the name already ends with it;
    counters end in ``_total``. ``prometheus_name("hw.energy", "J", "counter")``
    is ``hw_energy_joules_total``.
    """
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", otel_name)
    if name[:1].isdigit():
        name = "_" + name
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    suffix = _UNIT_SUFFIX.get(unit) or re.sub(r"[^a-zA-Z0-9_]", "_", unit).strip("_")
    if suffix and not name.endswith("_" + suffix):
        name = f"{name}_{suffix}"
    if kind == "counter" and not name.endswith("_total"):
        name += "_total"
    return name


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One row of ``gpu_metrics.csv``."""

    source: str
    field: str
    name: str
    kind: str
    unit: str
    scale: float
    scope: str
    attributes: tuple[tuple[str, str], ...]
    help: str

    @property
    def prom_name(self) -> str:
        return prometheus_name(self.name, self.unit, self.kind)


def load_metric_set(path: Path | str = METRICS_CSV, source: str | None = None) -> tuple[MetricSpec, ...]:
    """Read the metric set; ``source`` keeps only that source's rows.

    Lines starting with ``#`` are comments. Raises ValueError on a malformed
    row (wrong column count, unknown kind or scope, a bad scale) and OSError
    when the file cannot be read: a broken metric set is a deployment error,
    found once at start.
    """
    text = Path(path).read_text()
    rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(rows)
    specs = []
    for n, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}: row {n}: expected {len(reader.fieldnames or ())} columns")
        if row["kind"] not in ("gauge", "counter") or row["scope"] not in ("device", "process"):
            raise ValueError(f"{path}: row {n}: bad kind {row['kind']!r} or scope {row['scope']!r}")
        attrs = tuple(
            (k.strip(), v.strip())
            for k, _, v in (a.partition("=") for a in row["attributes"].split(";") if a.strip())
        )
        spec = MetricSpec(row["source"], row["field"], row["name"], row["kind"], row["unit"],
                          float(row["scale"]), row["scope"], attrs, row["help"])
        if source is None or spec.source == source:
            specs.append(spec)
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One fresh value for the exporters. ``attributes`` never holds a pid."""

    name: str
    prom_name: str
    unit: str
    kind: str
    help: str
    attributes: dict[str, str]
    value: float


def make_point(spec: MetricSpec, attributes: Mapping[str, str], value: float) -> MetricPoint:
    attrs = dict(attributes)
    attrs.update(spec.attributes)
    return MetricPoint(spec.name, spec.prom_name, spec.unit, spec.kind, spec.help, attrs, value)


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """A physical GPU, or a MIG device (``parent_uuid`` set)."""

    uuid: str
    index: int
    """NVML index of the physical GPU (a MIG device carries its parent's)."""
    name: str
    pci_bus_id: str
    mig_mode: bool = False
    """MIG is enabled on this physical GPU (always False on a MIG device)."""
    parent_uuid: str | None = None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    def attributes(self) -> dict[str, str]:
        """Attributes identifying this device on a metric point."""
        a = {
            "gpu.uuid": self.uuid,
            "hw.id": self.uuid,
            "gpu.index": str(self.index),
            "gpu.name": self.name,
            "gpu.pci_bus_id": self.pci_bus_id,
        }
        if self.parent_uuid is not None:
            a["hw.parent"] = self.parent_uuid
            a["gpu.mig.parent_uuid"] = self.parent_uuid
            a["gpu.mig.gi_id"] = str(self.gpu_instance_id)
            a["gpu.mig.ci_id"] = str(self.compute_instance_id)
        return a


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class NvmlConfig:
    """Settings of :class:`NvmlCollector`; validated once, in ``__post_init__``."""

    period_s: float = 1.0
    """Seconds between full samples of every GPU (NVML averages utilisation over 1/6 s to 1 s)."""
    fast_period_s: float = 0.2
    """Seconds between quick samples of each GPU's utilisation and power (one NVML call
    each), the fields the join reads for every record: a request shorter than ``period_s``
    then finds a reading at most this old. At or over ``period_s``: one sample of all fields."""
    history_seconds: float = 600
    """How far back device_window and process_window can look."""
    max_samples_per_key: int = 2400
    """Samples kept per GPU or (pid, GPU); bounds sample_now() bursts as well as the period."""
    max_processes: int = 1024
    """Most (pid, GPU) pairs tracked at once; more are dropped and counted."""
    processes: bool = True
    """Sample running compute processes and per-process utilisation."""
    events: bool = True
    """Watch XID critical-error events on their own thread."""
    event_timeout_ms: int = 500
    """Longest single nvmlEventSetWait_v2; bounds how fast stop() returns."""
    stale_periods: float = 3.0
    """points() omits values older than this many periods."""
    retry_initial_s: float = 1.0
    """First backoff after NVML or a GPU fails; doubles per failed retry."""
    retry_max_s: float = 60.0
    """Backoff ceiling."""
    discovery_period_s: float = 60.0
    """Seconds between device rediscoveries (MIG reconfiguration, hot-plug)."""
    max_xid_codes: int = 32
    """Distinct XID codes counted per GPU; later codes count as "other"."""
    lost_xids: tuple[int, ...] = (79,)
    """XID codes that mean the GPU is gone (79: fallen off the bus)."""
    metrics_csv: str | None = None
    """Metric set file; None means the bundled collectors/gpu_metrics.csv."""

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.history_seconds <= 0 or self.stale_periods <= 0:
            raise ValueError("period_s, history_seconds and stale_periods must be positive")
        if self.fast_period_s <= 0:
            raise ValueError("fast_period_s must be positive")
        if self.max_samples_per_key < 1 or self.max_processes < 1 or self.max_xid_codes < 1:
            raise ValueError("NVML bounds must be at least 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")
        if self.event_timeout_ms < 1 or self.discovery_period_s <= 0:
            raise ValueError("event_timeout_ms and discovery_period_s must be positive")


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 → ``initial_s``, doubling, capped)."""
    return min(max_s, initial_s * (2.0 ** max(0, failures - 1)))


# --------------------------------------------------------------------------- readers


def _read_utilization(h: Any) -> dict[str, float]:
    u = pynvml.nvmlDeviceGetUtilizationRates(h)
    return {"utilization.gpu": u.gpu, "utilization.memory": u.memory}


def _read_memory(h: Any) -> dict[str, float]:
    m = pynvml.nvmlDeviceGetMemoryInfo(h)
    out = {"memory.used": float(m.used), "memory.total": float(m.total)}
    if m.total:
        out["memory.utilization"] = m.used / m.total
    return out


def _read_temperature(h: Any) -> dict[str, float]:
    try:
        return {"temperature.gpu": pynvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU)}
    except pynvml.NVMLError_FunctionNotFound:
        # drivers before the R565 API have only the (now deprecated) unversioned call
        return {"temperature.gpu": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}


# (name, reader): each reader is one NVML call; NOT_SUPPORTED turns it off for that device.
_READERS: tuple[tuple[str, Callable[[Any], dict[str, float]]], ...] = (
    ("utilization", _read_utilization),
    ("memory", _read_memory),
    ("power", lambda h: {"power.draw": pynvml.nvmlDeviceGetPowerUsage(h)}),
    ("energy", lambda h: {"energy.total": pynvml.nvmlDeviceGetTotalEnergyConsumption(h)}),
    ("temperature", _read_temperature),
    ("clock.sm", lambda h: {"clocks.sm": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)}),
    ("clock.mem", lambda h: {"clocks.mem": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)}),
    ("pcie.tx", lambda h: {"pcie.tx": pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_TX_BYTES)}),
    ("pcie.rx", lambda h: {"pcie.rx": pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES)}),
)


#: The readers of the quick samples (every ``fast_period_s``): what a record's window reads,
#: utilisation for ``gpu.window.utilization.mean`` and power for its energy. A quick sample
#: holds their fields alone; a window too short to hold a sample takes each field from the
#: last sample before it that has the field (collectors.history), so the freshest of each.
_FAST_READERS: Final = frozenset({"utilization", "power"})


def _error_name(code: int) -> str:
    cls = pynvml.NVMLError._valClassMapping.get(code)
    return cls.__name__.removeprefix("NVMLError_") if cls is not None else str(code)


def _handle_address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def _pid_of_key(key: Hashable) -> Hashable:
    """The process history's group of a ``(pid, uuid)`` key: its pid."""
    return key[0] if isinstance(key, tuple) else key


class _Fatal(Exception):
    """NVML as a whole is unusable (wraps the NVMLError or OSError)."""


@dataclass
class _Dev:
    """Mutable per-device state; guarded by ``NvmlCollector._lock``."""

    info: GpuDevice
    handle: Any
    up: bool = True
    failures: int = 0
    retry_at: float = 0.0  # time.monotonic()
    unsupported: set[str] = field(default_factory=set)
    last: tuple[int, dict[str, float]] | None = None
    last_seen_us: int = 0  # nvmlDeviceGetProcessUtilization cursor
    mig_index: int | None = None


# --------------------------------------------------------------------------- collector


class NvmlCollector:
    """Samples NVML into time-indexed histories; see the module docstring."""

    def __init__(
        self,
        config: NvmlConfig = NvmlConfig(),  # frozen, so one shared default is safe
        *,
        metrics: SelfMetrics = SELF_METRICS,
        clock: Callable[[], int] = time.time_ns,
        library_path: str | None = None,
    ) -> None:
        """Raises ValueError/OSError only for a broken metric set file (a deployment error)."""
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._library_path = library_path
        self._library: ctypes.CDLL | None = None
        specs = load_metric_set(config.metrics_csv or METRICS_CSV, source="nvml")
        self._device_specs = [s for s in specs if s.scope == "device" and s.field != "xid"]
        self._process_specs = [s for s in specs if s.scope == "process"]
        self._xid_spec = next((s for s in specs if s.field == "xid"), None)
        self._scale = {s.field: s.scale for s in specs}
        period_ns = int(config.period_s * 1e9)
        self._stale_ns = int(config.stale_periods * period_ns)
        history_ns = int(config.history_seconds * 1e9)
        self._devices_history = History(
            "nvml.device", max_samples_per_key=config.max_samples_per_key, max_keys=256,
            max_age_ns=history_ns, max_fallback_age_ns=self._stale_ns, metrics=metrics)
        self._process_history = History(
            "nvml.process", max_samples_per_key=config.max_samples_per_key, max_keys=config.max_processes,
            max_age_ns=history_ns, max_fallback_age_ns=self._stale_ns, group_of=_pid_of_key, metrics=metrics)

        self._lock = threading.RLock()  # device state, xids, processes
        self._nvml_lock = threading.Lock()  # serialises init, shutdown, discovery and sampling
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._up = False
        self._inits = 0  # successful nvmlInit calls not yet shut down
        self._generation = 0  # bumped on every (re)init; the event thread rebuilds its set
        self._failures = 0
        self._retry_at = 0.0
        self._logged_down = False
        self._next_discovery = 0.0
        self._devs: list[_Dev] = []
        #: len(devices()), as a plain attribute the join reads per record
        self.device_count = 0
        self._by_address: dict[int, str] = {}
        self._xids: dict[tuple[str, str], int] = {}
        self._processes: Mapping[int, tuple[str, ...]] = _NO_PROCESSES
        self._processes_ns = 0
        self._proc_last: dict[tuple[int, str], tuple[int, dict[str, float]]] = {}
        self._util_last: dict[tuple[int, str], tuple[int, dict[str, float]]] = {}
        self._events_idle = threading.Event()
        self._events_idle.set()

        metrics.describe(COLLECTOR_UP, "gauge", "1 when the named collector source is working")
        metrics.describe(GPU_UP, "gauge", "1 when the GPU answers NVML queries, 0 when lost")
        metrics.describe(UNSUPPORTED, "counter", "NVML queries a device does not support (counted once per device)")
        metrics.describe(NVML_ERRORS, "counter", "NVML calls that failed for a reason other than not-supported")
        metrics.describe(RETRIES, "counter", "Retries of a failed collector source")
        metrics.describe(PROCESSES_DROPPED, "counter", "GPU processes not tracked because max_processes was reached")
        metrics.describe(XID_CODES_CAPPED, "counter", "XID events counted as code 'other' because max_xid_codes was reached")
        metrics.set(COLLECTOR_UP, 0, (("source", "nvml"),))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Initialise NVML (once, synchronously) and start the threads. Never raises."""
        if self._threads:
            return
        self._stop.clear()
        try:
            with self._nvml_lock:
                self._try_init()
            self.sample_now()  # the first sample is there when start() returns
        except Exception:  # never let a GPU problem stop the agent
            log.exception("unexpected error initialising NVML")
        sampler = threading.Thread(target=self._run_sampler, name="nvml-sampler", daemon=True)
        self._threads = [sampler]
        if self.config.events:
            self._threads.append(threading.Thread(target=self._run_events, name="nvml-events", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads and shut NVML down. Returns within about event_timeout_ms."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.config.event_timeout_ms / 1000 + 5)
        self._threads = []
        with self._nvml_lock:
            self._shutdown_locked()
            self._set_up(False)

    # ------------------------------------------------------------------ queries

    def devices(self) -> list[GpuDevice]:
        """Every known device, physical GPUs each followed by their MIG devices."""
        with self._lock:
            return [d.info for d in self._devs]

    def device_window(
        self, uuid: str, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """Samples of one GPU or MIG device over ``[t0_ns, t1_ns]`` (rules in
        :meth:`collectors.history.History.window`, ``fields`` too). Fields are the
        ``field`` column of gpu_metrics.csv, in base units (ratios, bytes, watts...)."""
        return self._devices_history.window(uuid, t0_ns, t1_ns, fields)

    def device_windows(
        self, uuids: Sequence[str], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]:
        """:meth:`device_window` of each of ``uuids``, in their order, at once."""
        return self._devices_history.window_each(uuids, t0_ns, t1_ns, fields)

    def process_window(
        self, pid: int, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """Samples of one process over ``[t0_ns, t1_ns]``: ``process.sm`` and
        ``process.memutil`` (ratios, from nvmlDeviceGetProcessUtilization, at
        NVML's own timestamps) and ``process.memory.used`` (bytes). A process on
        several GPUs gets one merged stream: means are per-GPU averages. ``fields``
        as for :meth:`device_window`."""
        return self._process_history.window_group(pid, t0_ns, t1_ns, fields)

    def process_windows(
        self, pids: Sequence[int], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]:
        """:meth:`process_window` of each of ``pids``, in their order, at once."""
        return self._process_history.window_groups(pids, t0_ns, t1_ns, fields)

    def processes(self) -> Mapping[int, tuple[str, ...]]:
        """pid → UUIDs (MIG UUIDs where placed on a MIG device) it runs on now;
        empty when the last process scan is stale. The last scan's own table, which each
        scan replaces and nothing changes: the join reads it for every record, so it is
        not copied (callers must not mutate it)."""
        if not self._up:  # no lock for the common answer of a node without NVML
            return _NO_PROCESSES
        with self._lock:
            if not self._up or self._clock() - self._processes_ns > self._stale_ns:
                return _NO_PROCESSES
            return self._processes

    def points(self) -> list[MetricPoint]:
        """Fresh device-level values for the exporters.

        Per-process values are never here (they would need ``process.pid``, an
        unbounded label); the join reads them from :meth:`process_points` and
        :meth:`process_window`. XID counts are cumulative and stay while
        collection is up, even for a lost GPU.
        """
        now = self._clock()
        out: list[MetricPoint] = []
        with self._lock:
            if not self._up:
                return out
            by_uuid = {d.info.uuid: d for d in self._devs}
            for dev in self._devs:
                if not dev.up or dev.last is None or now - dev.last[0] > self._stale_ns:
                    continue
                attrs = dev.info.attributes()
                values = dev.last[1]
                out.extend(make_point(s, attrs, values[s.field]) for s in self._device_specs if s.field in values)
            if self._xid_spec is not None:
                for (uuid, code), n in sorted(self._xids.items()):
                    known = by_uuid.get(uuid)
                    attrs = known.info.attributes() if known else {"gpu.uuid": uuid, "hw.id": uuid}
                    attrs["gpu.xid.code"] = code
                    out.append(make_point(self._xid_spec, attrs, float(n)))
        return out

    def process_points(self) -> list[tuple[int, MetricPoint]]:
        """Fresh per-process values as ``(pid, point)``; the point's attributes
        name the GPU, and the caller (the join) adds pod attributes in place of
        the pid. Utilisation is NVML's latest sample for the process, shown
        while younger than ``stale_periods`` periods by NVML's own timestamp
        (NVML only samples processes that ran, so an idle one has none)."""
        now = self._clock()
        out: list[tuple[int, MetricPoint]] = []
        with self._lock:
            if not self._up:
                return out
            infos = {d.info.uuid: d.info for d in self._devs}
            for key in sorted(set(self._proc_last) | set(self._util_last)):
                pid, uuid = key
                info = infos.get(uuid)
                if info is None:
                    continue
                values: dict[str, float] = {}
                for entry in (self._proc_last.get(key), self._util_last.get(key)):
                    if entry is not None and now - entry[0] <= self._stale_ns:
                        values.update(entry[1])
                attrs = info.attributes()
                out.extend((pid, make_point(s, attrs, values[s.field])) for s in self._process_specs
                           if s.field in values)
        return out

    def xid_counts(self) -> dict[tuple[str, str], int]:
        """(GPU uuid, XID code or "other") → events seen since start."""
        with self._lock:
            return dict(self._xids)

    # ------------------------------------------------------------------ sampling

    def sample_now(self) -> None:
        """Take one sample of every GPU (and its processes) now, in this thread.

        Blocks while another sample or a (re)initialisation runs. Never raises;
        does nothing while NVML is down (the sampling thread retries).
        """
        with self._nvml_lock:
            if not self._up:
                return
            try:
                self._sample_locked()
            except _Fatal as e:
                self._go_down(e)
            except Exception:
                log.exception("unexpected error sampling NVML")

    def _run_sampler(self) -> None:
        period = min(self.config.fast_period_s, self.config.period_s)
        wait = period
        next_full = time.monotonic() + self.config.period_s  # start() took the first full sample
        while not self._stop.wait(wait):
            try:
                with self._nvml_lock:
                    if not self._up:
                        if time.monotonic() >= self._retry_at:
                            self._metrics.inc(RETRIES, labels=(("source", "nvml"),))
                            self._try_init()
                    else:
                        if time.monotonic() >= self._next_discovery:
                            self._discover_locked()
                        # the full samples' schedule slips by up to a quick period, never drifts
                        if time.monotonic() + period / 2 >= next_full:
                            next_full = max(next_full + self.config.period_s, time.monotonic())
                            self._sample_locked()
                        else:
                            self._sample_locked(fast=True)
            except _Fatal as e:
                with self._nvml_lock:
                    self._go_down(e)
            except Exception:
                log.exception("unexpected error in the NVML sampler")
            wait = period
            if not self._up:  # nothing to do before the retry: no wakeup until then
                wait = max(0.01, self._retry_at - time.monotonic())

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call NVML; a fatal error becomes :class:`_Fatal`, others propagate."""
        try:
            return fn(*args)
        except pynvml.NVMLError as e:
            if e.value in _FATAL:
                raise _Fatal(e) from e
            raise

    def _try_init(self) -> None:
        """Load and initialise NVML, then discover devices. Holds ``_nvml_lock``."""
        try:
            if self._library_path is not None and self._library is None:
                try:
                    self._library = ctypes.CDLL(self._library_path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    raise _Fatal(e) from e
            if self._inits:
                self._shutdown_locked()
            self._call(pynvml.nvmlInit)
            self._inits += 1
            self._discover_locked()
        except _Fatal as e:
            self._go_down(e)
            return
        except pynvml.NVMLError as e:  # an unexpected code from init or discovery: same treatment
            self._go_down(e)
            return
        self._failures = 0
        with self._lock:
            self._generation += 1
        self._set_up(True)
        if self._logged_down:
            log.info("NVML available again: %d devices", len(self._devs))
        self._logged_down = False

    def _go_down(self, err: BaseException) -> None:
        """Turn collection off and schedule a retry. Holds ``_nvml_lock``."""
        cause = err.__cause__ if isinstance(err, _Fatal) and err.__cause__ else err
        was_up = self._up
        self._set_up(False)
        self._failures += 1
        delay = backoff_delay(self._failures, self.config.retry_initial_s, self.config.retry_max_s)
        self._retry_at = time.monotonic() + delay
        if not self._logged_down:
            missing = isinstance(cause, OSError) or (
                isinstance(cause, pynvml.NVMLError) and cause.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
            # no NVIDIA library is the normal state of a CPU-only node: say so quietly
            level = logging.INFO if missing and not was_up else logging.WARNING
            log.log(level, "NVML unavailable (%s): GPU metrics off, retrying with backoff", cause)
            self._logged_down = True
        else:
            log.debug("NVML still unavailable (%s); next retry in %.1fs", cause, delay)

    def _set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up
            if not up:
                self._generation += 1  # the event thread drops its set
        self._metrics.set(COLLECTOR_UP, 1 if up else 0, (("source", "nvml"),))

    def _shutdown_locked(self) -> None:
        """nvmlShutdown for every successful init, once the event thread has
        freed its event set (bounded wait; skipped if it does not)."""
        if not self._inits:
            return
        if not self._events_idle.wait(timeout=2 * self.config.event_timeout_ms / 1000 + 1):
            return
        while self._inits:
            self._inits -= 1
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass  # already gone with the driver; nothing to release

    def _discover_locked(self) -> None:
        """(Re)build the device list, keeping the state of devices already known."""
        self._next_discovery = time.monotonic() + self.config.discovery_period_s
        count = self._call(pynvml.nvmlDeviceGetCount)
        with self._lock:
            old = {d.info.uuid: d for d in self._devs}
            old_by_index = {d.info.index: d for d in self._devs if not d.info.is_mig}
        devs: list[_Dev] = []
        for index in range(count):
            try:
                devs.extend(self._discover_gpu(index, old))
            except pynvml.NVMLError as e:
                if isinstance(e, pynvml.NVMLError) and e.value in _LOST and index in old_by_index:
                    lost = old_by_index[index]
                    devs.append(lost)  # keep it (down) so it can come back
                    devs.extend(d for d in old.values() if d.info.parent_uuid == lost.info.uuid)
                    if lost.up:
                        self._gpu_down(lost, e)
                else:
                    self._metrics.inc(NVML_ERRORS, labels=(("call", "discover"), ("error", _error_name(e.value))))
        by_address = {_handle_address(d.handle): d.info.uuid for d in devs if not d.info.is_mig}
        with self._lock:
            gone = set(old) - {d.info.uuid for d in devs}
            self._devs = devs
            self.device_count = len(devs)
            if by_address != self._by_address:
                self._by_address = by_address
                self._generation += 1  # new handles: the event thread registers them
        for uuid in gone:
            self._metrics.set(GPU_UP, 0, (("gpu.uuid", uuid),))
        for d in devs:
            self._metrics.set(GPU_UP, 1 if d.up else 0, (("gpu.uuid", d.info.uuid),))

    def _discover_gpu(self, index: int, old: Mapping[str, _Dev]) -> list[_Dev]:
        h = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
        uuid = self._call(pynvml.nvmlDeviceGetUUID, h)
        name = self._call(pynvml.nvmlDeviceGetName, h)
        pci = self._call(pynvml.nvmlDeviceGetPciInfo, h).busId
        pci = pci.decode() if isinstance(pci, bytes) else str(pci)
        mig = False
        try:
            mig = self._call(pynvml.nvmlDeviceGetMigMode, h)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        except pynvml.NVMLError as e:
            if e.value not in _UNSUPPORTED:
                raise
        info = GpuDevice(uuid, index, name, pci, mig)
        out = [self._keep(old.get(uuid), info, h)]
        if not mig:
            return out
        for slot in range(self._call(pynvml.nvmlDeviceGetMaxMigDeviceCount, h)):
            try:
                mh = self._call(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, h, slot)
            except pynvml.NVMLError as e:
                if e.value == pynvml.NVML_ERROR_NOT_FOUND:
                    continue  # an empty slot
                raise
            muuid = self._call(pynvml.nvmlDeviceGetUUID, mh)
            minfo = GpuDevice(
                muuid, index, self._call(pynvml.nvmlDeviceGetName, mh), pci, False, uuid,
                self._call(pynvml.nvmlDeviceGetGpuInstanceId, mh),
                self._call(pynvml.nvmlDeviceGetComputeInstanceId, mh))
            dev = self._keep(old.get(muuid), minfo, mh)
            dev.mig_index = slot
            out.append(dev)
        return out

    @staticmethod
    def _keep(prev: _Dev | None, info: GpuDevice, handle: Any) -> _Dev:
        if prev is None or prev.info != info:
            return _Dev(info, handle)
        prev.handle = handle
        return prev

    def _gpu_down(self, dev: _Dev, err: BaseException | str) -> None:
        """Mark a GPU (and its MIG devices) lost; log once per outage. A MIG
        device that reports the loss takes its parent down with it."""
        with self._lock:
            if dev.info.is_mig:
                dev = next((d for d in self._devs if d.info.uuid == dev.info.parent_uuid), dev)
            family = [d for d in self._devs if d is dev or d.info.parent_uuid == dev.info.uuid] or [dev]
            first = dev.up
            for d in family:
                d.up = False
                d.last = None
            dev.failures += 1
            dev.retry_at = time.monotonic() + backoff_delay(
                dev.failures, self.config.retry_initial_s, self.config.retry_max_s)
        for d in family:
            self._metrics.set(GPU_UP, 0, (("gpu.uuid", d.info.uuid),))
        if first:
            log.warning("GPU %s lost (%s): its metrics are off, retrying with backoff", dev.info.uuid, err)

    def _revive(self, dev: _Dev) -> bool:
        """Try a lost physical GPU again; on success rediscover (new handles)."""
        self._metrics.inc(RETRIES, labels=(("source", "nvml.gpu"),))
        try:
            h = self._call(pynvml.nvmlDeviceGetHandleByIndex, dev.info.index)
            if self._call(pynvml.nvmlDeviceGetUUID, h) != dev.info.uuid:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            self._call(pynvml.nvmlDeviceGetMemoryInfo, h)
        except pynvml.NVMLError as e:
            self._gpu_down(dev, e)
            return False
        with self._lock:
            for d in self._devs:
                if d is dev or d.info.parent_uuid == dev.info.uuid:
                    d.up = True
            dev.failures = 0
        log.info("GPU %s is back", dev.info.uuid)
        self._discover_locked()
        return True

    def _sample_locked(self, fast: bool = False) -> None:
        """Sample every device: all fields, and the processes; or with ``fast``, only the
        quick readers (_FAST_READERS)."""
        now = self._clock()
        with self._lock:
            devs = list(self._devs)
        down = {d.info.uuid for d in devs if not d.up}
        for dev in devs:
            if dev.info.is_mig:
                if dev.info.parent_uuid in down:
                    continue
            elif not dev.up:
                if time.monotonic() < dev.retry_at or not self._revive(dev):
                    continue
                down.discard(dev.info.uuid)
                with self._lock:  # rediscovery replaced handles
                    devs_now = {d.info.uuid: d for d in self._devs}
                dev = devs_now.get(dev.info.uuid, dev)
            values = self._sample_device(dev, fast)
            if values is None:
                down.add(dev.info.uuid)
                continue
            if values:
                self._devices_history.add(dev.info.uuid, now, values)
                with self._lock:
                    if not fast:
                        dev.last = (now, values)
                    elif dev.last is not None:
                        # exported gauges take the fresher readings; the full sample's time
                        # still decides when they are stale
                        dev.last = (dev.last[0], {**dev.last[1], **values})
        if self.config.processes and not fast:
            self._sample_processes(now)

    def _sample_device(self, dev: _Dev, fast: bool) -> dict[str, float] | None:
        """One device's readings in base units (with ``fast``, the quick readers' alone); None
        when the GPU was lost."""
        values: dict[str, float] = {}
        for name, reader in _READERS:
            if name in dev.unsupported or (fast and name not in _FAST_READERS):
                continue
            try:
                raw = self._call(reader, dev.handle)
            except pynvml.NVMLError as e:
                if e.value in _UNSUPPORTED:
                    dev.unsupported.add(name)
                    self._metrics.inc(UNSUPPORTED, labels=(("field", name),))
                elif e.value in _LOST:
                    self._gpu_down(dev, e)
                    return None
                else:
                    self._metrics.inc(NVML_ERRORS, labels=(("call", name), ("error", _error_name(e.value))))
                continue
            values.update({f: v * self._scale.get(f, 1.0) for f, v in raw.items()})
        return values

    def _sample_processes(self, now: int) -> None:
        with self._lock:
            devs = [d for d in self._devs if d.up and not d.info.is_mig]
            migs = {(d.info.parent_uuid, d.info.gpu_instance_id, d.info.compute_instance_id): d.info.uuid
                    for d in self._devs if d.info.is_mig}
        procs: dict[int, list[str]] = {}
        latest: dict[tuple[int, str], tuple[int, dict[str, float]]] = {}
        with self._lock:
            util_last = dict(self._util_last)
        dropped = 0
        for dev in devs:
            uuid = dev.info.uuid
            placed: dict[int, str] = {}
            if "processes" not in dev.unsupported:
                for p in self._process_call(dev, "processes", pynvml.nvmlDeviceGetComputeRunningProcesses) or ():
                    target = uuid
                    if dev.info.mig_mode and p.gpuInstanceId != NO_INSTANCE:
                        target = migs.get((uuid, p.gpuInstanceId, p.computeInstanceId), uuid)
                    if len(latest) >= self.config.max_processes and (p.pid, target) not in latest:
                        dropped += 1
                        continue
                    placed[p.pid] = target
                    procs.setdefault(p.pid, [])
                    if target not in procs[p.pid]:
                        procs[p.pid].append(target)
                    values: dict[str, float] = {}
                    if p.usedGpuMemory is not None:
                        values["process.memory.used"] = p.usedGpuMemory * self._scale.get("process.memory.used", 1)
                        self._process_history.add((p.pid, target), now, values)
                    latest[(p.pid, target)] = (now, dict(values))
            if "process_utilization" in dev.unsupported:
                continue
            samples = self._process_call(dev, "process_utilization", pynvml.nvmlDeviceGetProcessUtilization,
                                         dev.last_seen_us)
            for s in samples or ():
                dev.last_seen_us = max(dev.last_seen_us, s.timeStamp)
                target = placed.get(s.pid, uuid)
                if (s.pid, target) not in latest and len(latest) >= self.config.max_processes:
                    dropped += 1
                    continue
                util = {"process.sm": s.smUtil * self._scale.get("process.sm", 0.01),
                        "process.memutil": s.memUtil * self._scale.get("process.memutil", 0.01)}
                # NVML stamps samples with CPU time in microseconds; keep its time, not ours
                t_ns = s.timeStamp * 1000
                self._process_history.add((s.pid, target), t_ns, util)
                latest.setdefault((s.pid, target), (now, {}))
                if t_ns >= util_last.get((s.pid, target), (0, {}))[0]:
                    util_last[(s.pid, target)] = (t_ns, util)
        if dropped:
            self._metrics.inc(PROCESSES_DROPPED, dropped)
        table = {pid: tuple(uuids) for pid, uuids in procs.items()}
        with self._lock:
            self._processes = table
            self._processes_ns = now
            self._proc_last = latest
            # bounded by the running set: a process that left takes its last sample with it
            self._util_last = {k: v for k, v in util_last.items() if k in latest}

    def _process_call(self, dev: _Dev, name: str, fn: Callable[..., Any], *args: Any) -> list[Any] | None:
        try:
            return list(self._call(fn, dev.handle, *args))
        except pynvml.NVMLError as e:
            if e.value == pynvml.NVML_ERROR_NOT_FOUND:
                return []  # no samples newer than the cursor
            if e.value in _UNSUPPORTED:
                dev.unsupported.add(name)
                self._metrics.inc(UNSUPPORTED, labels=(("field", name),))
            elif e.value in _LOST:
                self._gpu_down(dev, e)
            else:
                self._metrics.inc(NVML_ERRORS, labels=(("call", name), ("error", _error_name(e.value))))
            return None

    # ------------------------------------------------------------------ events

    def _run_events(self) -> None:
        """Own the event set: build it for each NVML generation, wait, free it."""
        event_set: Any = None
        built_for = -1
        timeout_ms = self.config.event_timeout_ms
        while not self._stop.is_set():
            with self._lock:
                generation = self._generation if self._up else -1
            if event_set is not None and generation != built_for:
                self._free_event_set(event_set)
                event_set = None
            if event_set is None:
                self._events_idle.set()
                if generation < 0:  # NVML is down: it comes up no sooner than the sampler's retry
                    self._stop.wait(max(timeout_ms / 1000, self._retry_at - time.monotonic() + 0.05))
                    continue
                event_set, built_for = self._build_event_set()
                if event_set is None:
                    self._stop.wait(timeout_ms / 1000)
                    continue
            try:
                data = pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)
            except pynvml.NVMLError as e:
                if e.value != pynvml.NVML_ERROR_TIMEOUT:
                    self._metrics.inc(NVML_ERRORS, labels=(("call", "event_wait"), ("error", _error_name(e.value))))
                    self._stop.wait(timeout_ms / 1000)  # let the sampler notice a dead driver
                continue
            except Exception:
                log.exception("unexpected error waiting for NVML events")
                self._stop.wait(timeout_ms / 1000)
                continue
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._on_xid(_handle_address(data.device), int(data.eventData))
        if event_set is not None:
            self._free_event_set(event_set)
        self._events_idle.set()

    def _build_event_set(self) -> tuple[Any, int]:
        """Create and register a set under ``_nvml_lock`` so that a shutdown
        never races it. Returns (None, -1) when NVML is down or refuses."""
        with self._nvml_lock, self._lock:
            if not self._up:
                return None, -1
            generation = self._generation
            devs = [d for d in self._devs if d.up and not d.info.is_mig]
            try:
                event_set = pynvml.nvmlEventSetCreate()
            except pynvml.NVMLError as e:
                self._metrics.inc(NVML_ERRORS, labels=(("call", "event_set"), ("error", _error_name(e.value))))
                return None, -1
            self._events_idle.clear()
        for dev in devs:
            if "events" in dev.unsupported:
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(dev.handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
            except pynvml.NVMLError as e:
                if e.value in _UNSUPPORTED:
                    dev.unsupported.add("events")
                    self._metrics.inc(UNSUPPORTED, labels=(("field", "events"),))
                else:
                    self._metrics.inc(NVML_ERRORS, labels=(("call", "register_events"), ("error", _error_name(e.value))))
        return event_set, generation

    @staticmethod
    def _free_event_set(event_set: Any) -> None:
        try:
            pynvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError:
            pass  # the driver went away with it

    def _on_xid(self, address: int, code: int) -> None:
        with self._lock:
            uuid = self._by_address.get(address)
            if uuid is None:
                return
            codes = {c for (u, c) in self._xids if u == uuid}
            label = str(code)
            if label not in codes and len(codes) >= self.config.max_xid_codes:
                label = "other"
                self._metrics.inc(XID_CODES_CAPPED)
            self._xids[(uuid, label)] = self._xids.get((uuid, label), 0) + 1
            dev = next((d for d in self._devs if d.info.uuid == uuid), None)
        if dev is not None and code in self.config.lost_xids and dev.up:
            self._gpu_down(dev, f"XID {code}")

