"""DCGM profiling fields, read from the node's dcgm-exporter ``/metrics``.

NVML has no SM occupancy, tensor-pipe or DRAM activity; DCGM's profiling
fields (``DCGM_FI_PROF_*``) do. Rather than link DCGM, the agent reads what
dcgm-exporter already serves on the node and keeps it in the same bounded,
time-indexed history as NVML, keyed by GPU UUID, so the join asks both the
same question: :meth:`DcgmCollector.device_window`.

Where the exporter is (``DcgmConfig.url``): when unset, each attempt tries in
order ``http://127.0.0.1:<port>/metrics`` (dcgm-exporter on the host network
or a hostPort) and ``http://$NODE_IP:<port>/metrics`` (the node's address, set
on the agent's pod from the downward API ``status.hostIP``), port 9400 by
default, and keeps the first that answers until it fails.

Joining: every line carries the GPU's ``UUID`` label. A MIG line also carries
``GPU_I_ID`` (and ``GPU_I_PROFILE``) with the *parent* UUID; it is resolved to
the MIG device through the NVML device list (``devices``). When a GPU
instance holds several compute instances, its values go to the one with the
lowest compute-instance ID. Unresolvable MIG lines are dropped and counted.

The exposition text is untrusted: the response is read up to
``max_response_bytes`` (the excess is cut at a line boundary and counted),
and a parse error is counted (``infersight.parse.failures``, reason
``dcgm_exposition``) per bad line while every good line is kept.

Degradation: an unreachable or failing exporter sets
``infersight.collector.up{source="dcgm"}`` to 0, logs once, and is retried with
exponential backoff. :meth:`DcgmCollector.points` omits values older than
``stale_periods`` periods.

Threads: ``start()`` runs one polling thread. Public methods are thread-safe;
only :meth:`DcgmCollector.sample_now` does I/O (bounded by ``timeout_s``).
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from collectors.history import History, WindowStats
from collectors.nvml import (
    COLLECTOR_UP,
    METRICS_CSV,
    RETRIES,
    GpuDevice,
    MetricPoint,
    backoff_delay,
    load_metric_set,
    make_point,
)

log = logging.getLogger(__name__)

PARSE_FAILURES = "infersight.parse.failures"
SCRAPE_FAILURES = "infersight.dcgm.scrape.failures"
TRUNCATED = "infersight.dcgm.response.truncated"
MIG_UNRESOLVED = "infersight.dcgm.mig.unresolved"
FIELDS_CAPPED = "infersight.dcgm.fields.capped"

_PARSE_ERRORS = (ValueError, IndexError, TypeError)


@dataclass(frozen=True)
class DcgmConfig:
    """Settings of :class:`DcgmCollector`; validated once, in ``__post_init__``."""

    url: str | None = None
    """dcgm-exporter metrics URL; None discovers it (127.0.0.1, then $NODE_IP, on ``port``)."""
    port: int = 9400
    """dcgm-exporter's port, used by discovery."""
    node_ip_env: str = "NODE_IP"
    """Environment variable holding the node's IP (downward API status.hostIP)."""
    period_s: float = 5.0
    """Seconds between scrapes; dcgm-exporter refreshes every 30 s unless its -c flag says otherwise."""
    timeout_s: float = 2.0
    """Connect and read timeout of one scrape."""
    max_response_bytes: int = 8 * 1024 * 1024
    """Most bytes read from one response; the rest is cut at a line boundary and counted."""
    history_seconds: float = 600
    """How far back device_window can look."""
    max_samples_per_key: int = 1200
    """Scrapes kept per device."""
    max_fields: int = 256
    """Distinct DCGM fields kept; later ones are dropped and counted."""
    stale_periods: float = 3.0
    """points() omits values older than this many periods."""
    retry_initial_s: float = 5.0
    """First backoff after a failed scrape; doubles per failure."""
    retry_max_s: float = 300.0
    """Backoff ceiling."""
    metrics_csv: str | None = None
    """Metric set file; None means the bundled collectors/gpu_metrics.csv."""

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.timeout_s <= 0 or self.history_seconds <= 0 or self.stale_periods <= 0:
            raise ValueError("DCGM periods and timeouts must be positive")
        if self.max_response_bytes < 1 or self.max_samples_per_key < 1 or self.max_fields < 1:
            raise ValueError("DCGM bounds must be at least 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")


@dataclass(frozen=True, slots=True)
class DcgmSample:
    """One parsed exposition line that names a GPU."""

    field: str
    uuid: str
    gpu_index: str
    model: str
    pci_bus_id: str
    gpu_instance_id: str  # "" when not MIG
    value: float


def parse_exposition(text: str, metrics: SelfMetrics = SELF_METRICS) -> list[DcgmSample]:
    """Every ``DCGM_FI_*`` sample with a ``UUID`` label in ``text``.

    prometheus_client's parser stops at the first malformed line (it raises
    ValueError or IndexError); on failure the text is parsed again line by
    line so that every good line is kept and each bad one counted in
    ``infersight.parse.failures`` (reason ``dcgm_exposition``). NaN values
    (a field the GPU does not support) are skipped. Never raises.
    """
    try:
        families = list(text_string_to_metric_families(text))
    except _PARSE_ERRORS:
        families = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            try:
                families.extend(text_string_to_metric_families(line + "\n"))
            except _PARSE_ERRORS:
                metrics.inc(PARSE_FAILURES, labels=(("reason", "dcgm_exposition"),))
    out: list[DcgmSample] = []
    for family in families:
        for s in family.samples:
            uuid = s.labels.get("UUID", "")
            if not s.name.startswith("DCGM_FI_") or not uuid or math.isnan(s.value):
                continue
            # the parser renames counter samples to <name>_total; DCGM field names never end so
            name = s.name.removesuffix("_total") if family.type == "counter" else s.name
            out.append(DcgmSample(
                name, uuid, s.labels.get("gpu", ""), s.labels.get("modelName", ""),
                s.labels.get("pci_bus_id", ""), s.labels.get("GPU_I_ID", ""), float(s.value)))
    return out


class DcgmCollector:
    """Scrapes dcgm-exporter into a time-indexed history; see the module docstring."""

    def __init__(
        self,
        config: DcgmConfig = DcgmConfig(),  # frozen, so one shared default is safe
        *,
        devices: Callable[[], list[GpuDevice]] | None = None,
        metrics: SelfMetrics = SELF_METRICS,
        clock: Callable[[], int] = time.time_ns,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """``devices`` (usually ``NvmlCollector.devices``) resolves MIG lines
        and names devices; without it, devices are named from the exporter's
        labels and MIG lines cannot be joined. Raises ValueError/OSError only
        for a broken metric set file."""
        self.config = config
        self._devices = devices
        self._metrics = metrics
        self._clock = clock
        self._environ = environ
        self._specs = [s for s in load_metric_set(config.metrics_csv or METRICS_CSV, source="dcgm")
                       if s.scope == "device"]
        self._stale_ns = int(config.stale_periods * config.period_s * 1e9)
        self._history = History(
            "dcgm.device", max_samples_per_key=config.max_samples_per_key, max_keys=256,
            max_age_ns=int(config.history_seconds * 1e9), max_fallback_age_ns=self._stale_ns, metrics=metrics)
        # node-local endpoint: never send it through an HTTP proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()  # state below
        self._scrape_lock = threading.Lock()  # one scrape at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._url: str | None = config.url
        self._up = False
        self._failures = 0
        self._retry_at = 0.0
        self._logged_down = False
        self._fields: set[str] = set()
        self._latest: dict[str, tuple[int, dict[str, float]]] = {}
        self._info: dict[str, GpuDevice] = {}
        metrics.describe(PARSE_FAILURES, "counter", "Input that could not be parsed, by reason")
        metrics.describe(SCRAPE_FAILURES, "counter", "dcgm-exporter scrapes that failed, by reason")
        metrics.describe(TRUNCATED, "counter", "dcgm-exporter responses cut at max_response_bytes")
        metrics.describe(MIG_UNRESOLVED, "counter", "DCGM MIG lines whose GPU instance NVML does not know")
        metrics.describe(FIELDS_CAPPED, "counter", "DCGM samples dropped because max_fields was reached")
        metrics.set(COLLECTOR_UP, 0, (("source", "dcgm"),))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the polling thread (the first scrape happens on it). Never raises."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dcgm-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; returns within about ``timeout_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout_s + 5)
        self._thread = None
        self._set_up(False)

    def candidate_urls(self) -> list[str]:
        """URLs tried in order: the configured one, or the discovery list."""
        if self.config.url:
            return [self.config.url]
        urls = [f"http://127.0.0.1:{self.config.port}/metrics"]
        node_ip = self._environ.get(self.config.node_ip_env, "").strip()
        if node_ip:
            host = f"[{node_ip}]" if ":" in node_ip else node_ip
            url = f"http://{host}:{self.config.port}/metrics"
            if url not in urls:
                urls.append(url)
        return urls

    @property
    def url(self) -> str | None:
        """The URL of the last successful scrape."""
        with self._lock:
            return self._url

    # ------------------------------------------------------------------ queries

    def device_window(
        self, uuid: str, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """DCGM fields of one GPU or MIG device over ``[t0_ns, t1_ns]``, keyed
        by DCGM field name (``DCGM_FI_PROF_SM_ACTIVE``...) with the exporter's
        values; rules in :meth:`collectors.history.History.window`, ``fields`` too."""
        return self._history.window(uuid, t0_ns, t1_ns, fields)

    def points(self) -> list[MetricPoint]:
        """Fresh values of the fields listed in gpu_metrics.csv (source dcgm)."""
        now = self._clock()
        out: list[MetricPoint] = []
        with self._lock:
            if not self._up:
                return out
            for uuid, (t, values) in sorted(self._latest.items()):
                info = self._info.get(uuid)
                if info is None or now - t > self._stale_ns:
                    continue
                attrs = info.attributes()
                out.extend(make_point(s, attrs, values[s.field]) for s in self._specs if s.field in values)
        return out

    # ------------------------------------------------------------------ scraping

    def sample_now(self) -> bool:
        """Scrape once now, in this thread (blocking up to ``timeout_s`` per
        URL tried). Returns whether it succeeded. Never raises."""
        with self._scrape_lock:
            try:
                return self._scrape()
            except Exception:
                log.exception("unexpected error scraping dcgm-exporter")
                return False

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            if not self._up and time.monotonic() < self._retry_at:
                wait = self._retry_at - time.monotonic()  # nothing to do before the retry
                continue
            if not self._up and self._failures:
                self._metrics.inc(RETRIES, labels=(("source", "dcgm"),))
            self.sample_now()
            wait = self.config.period_s
            if not self._up:
                wait = max(0.01, self._retry_at - time.monotonic())

    def _scrape(self) -> bool:
        with self._lock:
            known = self._url
        urls = [known] if known else self.candidate_urls()
        errors: list[str] = []
        for url in urls:
            try:
                text = self._fetch(url)
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
                reason = type(e).__name__
                self._metrics.inc(SCRAPE_FAILURES, labels=(("reason", reason),))
                errors.append(f"{url}: {e}")
                continue
            self._ingest(text, self._clock())
            with self._lock:
                self._url = url
            self._failures = 0
            if self._logged_down:
                log.info("dcgm-exporter reachable again at %s", url)
            self._logged_down = False
            self._set_up(True)
            return True
        with self._lock:
            self._url = self.config.url  # rediscover next time
        self._set_up(False)
        self._failures += 1
        delay = backoff_delay(self._failures, self.config.retry_initial_s, self.config.retry_max_s)
        self._retry_at = time.monotonic() + delay
        if not self._logged_down:
            log.warning("dcgm-exporter unavailable (%s): DCGM profiling metrics off, retrying with backoff",
                        "; ".join(errors))
            self._logged_down = True
        return False

    def _fetch(self, url: str) -> str:
        """GET ``url``; raises OSError (URLError, HTTPError for a non-2xx status,
        timeouts), http.client.HTTPException for a broken response, ValueError
        for a bad URL."""
        req = urllib.request.Request(url, headers={"Accept": "text/plain"})
        with self._opener.open(req, timeout=self.config.timeout_s) as resp:
            body = resp.read(self.config.max_response_bytes + 1)
        if len(body) > self.config.max_response_bytes:
            self._metrics.inc(TRUNCATED)
            body = body[: self.config.max_response_bytes]
            body = body[: body.rfind(b"\n") + 1]  # a cut line would parse as a wrong value
        return body.decode("utf-8", errors="replace")

    def _ingest(self, text: str, now: int) -> None:
        samples = parse_exposition(text, self._metrics)
        devices = self._devices() if self._devices is not None else []
        by_uuid = {d.uuid: d for d in devices}
        mig_by_gi: dict[tuple[str, int], GpuDevice] = {}
        for d in sorted((d for d in devices if d.is_mig), key=lambda d: d.compute_instance_id or 0):
            if d.parent_uuid is not None and d.gpu_instance_id is not None:
                mig_by_gi.setdefault((d.parent_uuid, d.gpu_instance_id), d)
        values: dict[str, dict[str, float]] = {}
        infos: dict[str, GpuDevice] = {}
        capped = unresolved = 0
        for s in samples:
            if s.field not in self._fields:
                if len(self._fields) >= self.config.max_fields:
                    capped += 1
                    continue
                self._fields.add(s.field)
            uuid = s.uuid
            info = by_uuid.get(uuid)
            if s.gpu_instance_id:
                mig = mig_by_gi.get((s.uuid, int(s.gpu_instance_id))) if s.gpu_instance_id.isdigit() else None
                if mig is None:
                    unresolved += 1
                    continue
                uuid, info = mig.uuid, mig
            if info is None:
                index = int(s.gpu_index) if s.gpu_index.isdigit() else -1
                info = GpuDevice(uuid, index, s.model, s.pci_bus_id)
            infos[uuid] = info
            # one value per device and field: the same GPU repeats per pod under time-slicing
            values.setdefault(uuid, {}).setdefault(s.field, s.value)
        if capped:
            self._metrics.inc(FIELDS_CAPPED, capped)
        if unresolved:
            self._metrics.inc(MIG_UNRESOLVED, unresolved)
        for uuid, v in values.items():
            self._history.add(uuid, now, v)
        with self._lock:
            self._latest = {uuid: (now, v) for uuid, v in values.items()}
            self._info = infos

    def _set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up
        self._metrics.set(COLLECTOR_UP, 1 if up else 0, (("source", "dcgm"),))
