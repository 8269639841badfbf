"""The capture pipeline, wired in one place.

    SocketProbe (kernel) ──drain thread──► [raw_to_assembly: bounded queue]
        ──assembly thread──► Assembler ──► join stages ──► sinks (JSONL, OTLP, Prometheus)
    discovery thread: exec/fork/exit/listen events + periodic /proc rescans
        ──► probe targets, and sockets already open seeded into the probe

The queue between the drain and the assembly blocks when full instead of
dropping: back-pressure then fills the kernel ring buffer, whose losses are
counted per connection (so that every request is either recorded or counted
as lost, in one place). Each stage between the assembler and the sinks is a
function ``Request -> Request``; a disabled stage is simply not in the list.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent import native, procfs
from agent.assemble import Assembler, AssemblyConfig
from agent.clock import Clock
from agent.export import Sink
from agent.record import ActiveRequest, Request
from agent.selfmetrics import SELF_METRICS, SelfMetrics
from agent.targets import TargetConfig, TargetSelector
from probes.socket_events import (
    PK_EXEC,
    PK_EXIT,
    PK_FORK,
    PK_LISTEN,
    PK_TLS,
    ROLE_CLIENT,
    ROLE_SERVER,
    Decoder,
    ProcEvent,
    unpack,
)

log = logging.getLogger(__name__)

Stage = Callable[[Request], Request]


class CaptureProbe(Protocol):
    """What the pipeline needs of the socket probe (``probes.sockets.SocketProbe``)."""

    def add_target(self, pid: int) -> None: ...
    def remove_target(self, pid: int) -> None: ...
    def seed_conn(self, pid: int, fd: int, role: int, conn_id: int) -> bool: ...
    def conn_alive(self, pid: int, fd: int, conn_id: int) -> bool: ...
    def conn_keys(self) -> list[tuple[int, int]]: ...
    def delete_conn(self, pid: int, fd: int) -> None: ...
    def drain(self, timeout_ms: int) -> int: ...
    def counters(self) -> dict[str, int]: ...
    def map_entries(self) -> dict[str, tuple[int, int]]: ...
    def conn_evictions(self, entries: int) -> int: ...
    def attach_tls(self, pid: int, proc: str = "/proc") -> str: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class PipelineConfig:
    """How the capture path runs."""

    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    drain_interval_s: float = 0.1
    """Ring buffer drain period (records are sent without wakeups). Each drain costs something
    beyond its records (it wakes the drain and assembly threads): under load, 0.1 s cost a
    streamed request about 1.3 µs less than 0.05 s (with the ring buffer sized to hold 0.1 s:
    ``ringbuf_pages``)."""
    queue_batches: int = 256
    """Batches buffered between the drain and the assembly (blocks when full)."""
    stats_interval_s: float = 1.0
    """Period of kernel counter reads into the self-metrics."""
    map_fill_interval_s: float = 10.0
    """Period of BPF map fill measurements (each walks the maps' keys)."""
    proc: str = "/proc"
    """Where the host's /proc is (a DaemonSet mounts it at /host/proc)."""


def _wake() -> None:
    """Queued for the assembly thread to wake it; does nothing."""


class Pipeline:
    """Owns the probe, the threads and the assembler. ``start()`` raises when
    the probe cannot load; everything after that degrades instead of raising."""

    def __init__(
        self,
        config: PipelineConfig,
        probe_factory: Callable[[Callable[[bytes], None]], CaptureProbe],
        sinks: Sequence[Sink],
        *,
        stages: Sequence[Stage] = (),
        metrics: SelfMetrics = SELF_METRICS,
        layout_decoder: Decoder | None = None,
        target_listeners: Sequence[Callable[[int, bool], None]] = (),
    ) -> None:
        self.config = config
        self._probe_factory = probe_factory
        self._sinks = list(sinks)
        self._stages = list(stages)
        # called with (pid, True) when a process becomes a target, (pid, False) when it stops being one;
        # other probes (CUDA) follow the same targets
        self._target_listeners = list(target_listeners)
        self._metrics = metrics
        self._emitted = metrics.counter("infersight.records.emitted")
        self._decoder = layout_decoder or Decoder()
        self._queue: queue.Queue[bytes | Callable[[], None]] = queue.Queue(config.queue_batches)
        self._proc_events: queue.Queue[ProcEvent | None] = queue.Queue(4096)
        self._stop = threading.Event()
        self._drained = threading.Event()  # the drain thread took its last records
        self._threads: list[threading.Thread] = []
        self._selector = TargetSelector(config.targets, proc=config.proc)
        self._targets: set[int] = set()
        self._tls_state: dict[int, str] = {}  # target -> hooked | unhooked | none
        self._tls_seen: set[int] = set()  # targets seen doing TLS handshakes the hooks do not decrypt
        self.clock = Clock()
        self.probe: CaptureProbe | None = None
        self.assembler: Assembler | None = None
        self.attach_seconds: float | None = None
        self.records = 0

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        probe = self._probe_factory(self._enqueue)
        self.probe = probe
        self.assembler = Assembler(
            self.config.assembly,
            self._emit,
            clock=self.clock,
            decoder=self._decoder,
            process_name=lambda pid: procfs.comm(pid, self.config.proc),
            conn_alive=probe.conn_alive,
            sockets=procfs.SocketTable(self.config.proc),
            proc=self.config.proc,
            metrics=self._metrics,
            on_proc_event=self._on_proc_event,
        )
        for pid in sorted(self._selector.scan()):
            self._attach(pid)
        self.attach_seconds = time.monotonic() - t0
        self._metrics.set("infersight.startup.seconds", self.attach_seconds)
        self._metrics.gauge_callback(
            "infersight.targets",
            lambda: {(): float(len(self._targets))},
            help="Processes traced now.",
        )
        self._metrics.gauge_callback(
            "infersight.tls.targets",
            self._tls_counts,
            help="Targets by TLS capture state: hooked, unhooked (a TLS library that cannot be hooked), none.",
        )
        self._metrics.gauge_callback(
            "infersight.target.tls",
            self._tls_per_target,
            help="1 per traced process, labelled with its TLS capture state (hooked, unhooked, none).",
        )
        self._metrics.gauge_callback(
            "infersight.queue.size",
            lambda: {(("queue", "raw_to_assembly"),): float(self._queue.qsize())},
            help="Batches waiting between the ring buffer drain and assembly.",
        )
        log.info("attached to %d target(s) in %.2fs: %s", len(self._targets), self.attach_seconds,
                 sorted(self._targets))
        native_state = native.status()
        (log.warning if "stale" in native_state.values() else log.info)("%s", native.summary(native_state))
        # HTTP/2 capture compiles and loads now, in the background (see probes/sockets.py)
        start_h2 = getattr(self.probe, "start_h2", None)
        if start_h2 is not None:
            start_h2()
        for name, fn in (("drain", self._drain_loop), ("assembly", self._assembly_loop),
                         ("discovery", self._discovery_loop)):
            t = threading.Thread(target=_named, args=(f"infersight-{name}", fn), name=f"infersight-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Drain what the kernel holds, finish assembly, flush sinks, detach."""
        self._stop.set()
        try:
            self._proc_events.put_nowait(None)  # wakes the discovery thread
        except queue.Full:
            pass  # it has events to handle, and sees the stop after them
        for t in self._threads:
            t.join(timeout=10)
        if self.assembler is not None:
            open_now = self.assembler.open_requests()
            if open_now:
                self._metrics.inc("infersight.requests.lost", open_now, (("reason", "shutdown"),))
        self._read_kernel_counters()
        for s in self._sinks:
            try:
                s.flush()
                s.shutdown()
            except Exception:
                log.exception("sink %s failed to shut down", type(s).__name__)
        if self.probe is not None:
            self.probe.close()

    def active(self) -> list[ActiveRequest]:
        return self.assembler.active() if self.assembler is not None else []

    @property
    def _probe(self) -> CaptureProbe:
        assert self.probe is not None, "start() first"
        return self.probe

    @property
    def targets(self) -> set[int]:
        return set(self._targets)

    # ---- threads -----------------------------------------------------------------
    def _enqueue(self, batch: bytes) -> None:
        """One drained batch of records (packed: probes.socket_events.pack) to assembly."""
        # blocking put: back-pressure goes to the kernel ring buffer, where loss is counted
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._metrics.inc("infersight.queue.full", labels=(("queue", "raw_to_assembly"),))
                if not any(t.is_alive() for t in self._threads if t.name == "infersight-assembly"):
                    self._metrics.inc("infersight.queue.dropped", len(unpack(batch)), (("queue", "raw_to_assembly"),))
                    return

    def _drain_loop(self) -> None:
        timeout_ms = int(self.config.drain_interval_s * 1000)
        probe = self._probe
        while not self._stop.is_set():
            try:
                probe.drain(timeout_ms)
            except Exception:
                log.exception("ring buffer drain failed")
                self._metrics.inc("infersight.drain.errors")
                time.sleep(self.config.drain_interval_s)
        # a last drain for what the kernel holds after the stop signal
        try:
            probe.drain(0)
        except Exception:
            log.exception("final drain failed")
        finally:
            self._drained.set()
            # wake the assembly, which waits up to a stats period for work
            try:
                self._queue.put_nowait(_wake)
            except queue.Full:
                pass  # the assembly has work, and sees the flag after it

    def _assembly_loop(self) -> None:
        assert self.assembler is not None
        next_stats = 0.0
        next_fill = 0.0
        while True:
            # idle, the thread wakes only for its periodic work (the stop wakes it too)
            wait = min(next_stats, next_fill) - time.monotonic()
            try:
                item = self._queue.get(timeout=max(0.001, min(wait, self.config.stats_interval_s)))
            except queue.Empty:
                item = None
            if item is not None:
                if callable(item):
                    item()
                else:
                    self._metrics.inc("infersight.events.received", self.assembler.feed(item))
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.config.stats_interval_s
                self._read_kernel_counters()
                self.assembler.sweep(time.monotonic_ns())
                self.clock.maybe_resync()
            if now >= next_fill:
                next_fill = now + self.config.map_fill_interval_s
                self._read_map_fill()
            if self._stop.is_set() and self._queue.empty() and (
                self._drained.is_set()
                or not any(t.is_alive() for t in self._threads if t.name == "infersight-drain")
            ):
                return

    def _discovery_loop(self) -> None:
        next_scan = time.monotonic() + self.config.targets.rescan_s
        while not self._stop.is_set():
            # process events wake the thread; so does the stop (a None)
            try:
                ev = self._proc_events.get(
                    timeout=max(0.001, min(next_scan - time.monotonic(), self.config.targets.rescan_s)))
            except queue.Empty:
                ev = None
            if ev is not None:
                self._handle_proc_event(ev)
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self.config.targets.rescan_s
                self._rescan()

    # ---- targets -------------------------------------------------------------------
    def _on_proc_event(self, ev: ProcEvent) -> None:
        try:
            self._proc_events.put_nowait(ev)
        except queue.Full:
            self._metrics.inc("infersight.queue.dropped", labels=(("queue", "proc_events"),))

    def _handle_proc_event(self, ev: ProcEvent) -> None:
        probe = self._probe
        if ev.kind == PK_FORK:
            tgid = procfs.tgid_of(ev.pid, self.config.proc)
            if tgid is not None and tgid != ev.pid:
                probe.remove_target(ev.pid)
            elif tgid == ev.pid:
                self._targets.add(ev.pid)
                self._check_tls(ev.pid)
                self._notify(ev.pid, True)
                self._seed(ev.pid)  # inherited sockets
        elif ev.kind == PK_EXIT:
            if ev.tgid in self._targets:
                self._notify(ev.tgid, False)
            self._targets.discard(ev.tgid)
            self._tls_state.pop(ev.tgid, None)
            self._tls_seen.discard(ev.tgid)
            self._drop_conns(ev.tgid)
        elif ev.kind == PK_TLS:
            if ev.tgid in self._targets and ev.tgid not in self._tls_seen:
                self._tls_seen.add(ev.tgid)
                if self._tls_state.get(ev.tgid) != "hooked":
                    log.warning("pid %d serves TLS that is not decrypted (TLS capture off, see --tls, or a TLS "
                                "library that cannot be hooked): its HTTPS requests are not captured", ev.tgid)
        elif ev.kind in (PK_EXEC, PK_LISTEN):
            if ev.tgid not in self._targets and self._selector.matches(ev.tgid):
                self._attach(ev.tgid)
            elif ev.kind == PK_EXEC and ev.tgid in self._targets and not self._selector.matches(ev.tgid) \
                    and ev.tgid not in self.config.targets.pids and self.config.targets.pids == ():
                # the process exec'd into something that is not a server
                self._detach(ev.tgid)

    def _rescan(self) -> None:
        now = self._selector.scan()
        for pid in now - self._targets:
            self._attach(pid)
        for pid in list(self._targets):
            self._check_tls(pid)
        for pid in list(self._targets):
            if not os.path.exists(f"{self.config.proc}/{pid}"):
                self._detach(pid)

    def _tls_counts(self) -> dict[tuple[tuple[str, str], ...], float]:
        counts = {"hooked": 0.0, "unhooked": 0.0, "none": 0.0}
        for pid in list(self._targets):
            counts[self._tls_state_of(pid)] += 1
        return {(("state", k),): v for k, v in counts.items()}

    def _tls_state_of(self, pid: int) -> str:
        state = self._tls_state.get(pid, "none")
        if state == "none" and pid in self._tls_seen:
            return "unhooked"  # TLS on the wire, no hook: static TLS, or capture off
        return state

    def _tls_per_target(self) -> dict[tuple[tuple[str, str], ...], float]:
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for pid in list(self._targets):
            labels = (("pid", str(pid)), ("command", procfs.comm(pid, self.config.proc) or ""),
                      ("state", self._tls_state_of(pid)))
            out[labels] = 1.0
        return out

    def _check_tls(self, pid: int) -> None:
        """Hook the TLS library the target maps (again at rescans: Python loads it lazily)."""
        if self._tls_state.get(pid) == "hooked":
            return
        try:
            self._tls_state[pid] = self._probe.attach_tls(pid, self.config.proc)
        except Exception:
            self._metrics.inc("infersight.tls.attach.errors")
            log.exception("TLS hooks for pid %d failed", pid)

    def _notify(self, pid: int, added: bool) -> None:
        for fn in self._target_listeners:
            try:
                fn(pid, added)
            except Exception:
                self._metrics.inc("infersight.target.listener.errors")
                log.exception("target listener failed for pid %d", pid)

    def _attach(self, pid: int) -> None:
        self._probe.add_target(pid)
        self._targets.add(pid)
        self._check_tls(pid)
        self._notify(pid, True)
        self._metrics.inc("infersight.targets.attached")
        self._seed(pid)
        log.info("tracing pid %d (%s)", pid, procfs.comm(pid, self.config.proc))

    def _detach(self, pid: int) -> None:
        self._probe.remove_target(pid)
        self._targets.discard(pid)
        self._tls_state.pop(pid, None)
        self._notify(pid, False)
        self._drop_conns(pid)

    def _drop_conns(self, pid: int) -> None:
        probe = self._probe
        try:
            for tgid, fd in probe.conn_keys():
                if tgid == pid:
                    probe.delete_conn(pid, fd)
        except Exception:
            log.debug("could not clean connections of pid %d", pid, exc_info=True)

    def _seed(self, pid: int) -> None:
        """Track sockets the process already has open (connections made before
        we attached), so their next requests are captured."""
        fds = procfs.socket_fds(pid, self.config.proc)
        if not fds:
            return
        table = procfs.read_tcp_table(pid, self.config.proc)
        listening = procfs.listening_in(table, fds)
        assembler = self.assembler
        assert assembler is not None
        seeded = []
        for fd, ino in fds.items():
            info = table.get(ino)
            if info is None or info.state != procfs.TCP_ESTABLISHED:
                continue
            role = ROLE_SERVER if info.local_port in listening else ROLE_CLIENT
            if role == ROLE_CLIENT and not self.config.assembly.client_spans:
                continue
            seeded.append((fd, role, info))

        def register() -> None:
            for fd, role, info in seeded:
                conn_id = assembler.next_seed_id()
                if self._probe.seed_conn(pid, fd, role, conn_id):
                    if role == ROLE_SERVER:
                        assembler.register_conn(conn_id, pid, fd, role, info.local_port, info.remote_addr,
                                                info.remote_port)
                    else:
                        assembler.register_conn(conn_id, pid, fd, role, info.remote_port, info.local_addr,
                                                info.local_port)
                    self._metrics.inc("infersight.connections.seeded")

        if seeded:
            if threading.current_thread().name == "infersight-assembly" or not self._threads:
                register()
            else:
                self._queue.put(register)

    # ---- output --------------------------------------------------------------------
    def _emit(self, record: Request) -> None:
        for stage in self._stages:
            try:
                record = stage(record)
            except Exception:
                self._metrics.inc("infersight.stage.errors", labels=(("stage", getattr(stage, "__name__", "?")),))
                log.exception("stage failed; record passed on unchanged")
        self.records += 1
        self._emitted.inc()
        for s in self._sinks:
            try:
                s.emit(record)
            except Exception:
                self._metrics.inc("infersight.sink.errors", labels=(("sink", type(s).__name__),))
                log.exception("sink failed")

    def _read_map_fill(self) -> None:
        """Entries / max_entries of each BPF map: at 1.0 an LRU map evicts (connection state
        is then lost for the oldest connections) and a hash map refuses new entries."""
        if self.probe is None:
            return
        try:
            fill = self.probe.map_entries()
        except Exception:
            self._metrics.inc("infersight.bpf.map.read.errors")
            return
        self._metrics.describe("infersight.bpf.map.fill_ratio", "gauge", "BPF map entries over max_entries.")
        for name, (n, cap) in fill.items():
            self._metrics.set("infersight.bpf.map.entries", n, (("map", name),))
            self._metrics.set("infersight.bpf.map.fill_ratio", n / cap if cap else 0.0, (("map", name),))
        if "conns" in fill:
            evicted = self.probe.conn_evictions(fill["conns"][0])
            self._metrics.describe("infersight.bpf.map.evictions", "counter",
                                   "Entries an LRU map evicted to make room (connection state lost).")
            labels = (("map", "conns"),)
            # a counter: never let a race between the count and the walk take it back
            self._metrics.set("infersight.bpf.map.evictions",
                              max(evicted, self._metrics.get("infersight.bpf.map.evictions", labels)), labels)

    def _read_kernel_counters(self) -> None:
        if self.probe is None:
            return
        try:
            k = self.probe.counters()
        except Exception:
            return
        m = self._metrics
        m.describe("infersight.kernel.requests", "counter", "Request phases the kernel saw start.")
        m.set("infersight.kernel.requests", k["requests"])
        m.describe("infersight.kernel.foreign", "counter", "Request phases that did not look like HTTP.")
        m.set("infersight.kernel.foreign", k["foreign"])
        m.describe("infersight.events.lost", "counter", "Ring buffer records the kernel could not send.")
        for kind in ("data", "summary", "conn", "proc", "h2"):
            m.set("infersight.events.lost", k[f"lost_{kind}"], (("type", kind),))
        m.describe("infersight.kernel.connections", "counter", "Connections tracked from accept/connect.")
        m.set("infersight.kernel.connections", k["conns"])
        m.describe("infersight.kernel.connections.replaced", "counter",
                   "Tracked connections whose fd number a new connection took before their close was seen"
                   " (their state ended then).")
        m.set("infersight.kernel.connections.replaced", k["replaced"])
        m.describe("infersight.kernel.tail_rings.reclaimed", "counter",
                   "Streamed responses whose tail ring the pool gave to a newer stream before they ended"
                   " (they took another; their earlier kept writes were lost).")
        m.set("infersight.kernel.tail_rings.reclaimed", k["tails_reclaimed"])
        m.describe("infersight.kernel.vectored.end_unread", "counter",
                   "Vectored writes (sendmsg, writev) whose end lay past the iovecs the probe scans"
                   " (64): kept without their last bytes.")
        m.set("infersight.kernel.vectored.end_unread", k["iov_end_unread"])
        m.set("infersight.kernel.conn_map.full", k["conn_full"])
        m.set("infersight.kernel.truncated", k["truncated"])
        m.describe("infersight.kernel.h2.connections", "counter",
                   "Connections switched to HTTP/2 framing (by the preface, or joined mid-stream).")
        m.set("infersight.kernel.h2.connections", k["h2_conns"])
        m.describe("infersight.kernel.h2.frames", "counter", "HTTP/2 frames cut in the kernel, by fate.")
        m.set("infersight.kernel.h2.frames", k["h2_frames"] - k["h2_elided"], (("fate", "sent"),))
        m.set("infersight.kernel.h2.frames", k["h2_elided"], (("fate", "aggregated"),))
        m.describe("infersight.kernel.h2.desync", "counter",
                   "Directions of HTTP/2 connections whose kernel frame walk lost sync (then sent raw).")
        m.set("infersight.kernel.h2.desync", k["h2_desync"])
        m.describe("infersight.kernel.h2.stream_map.full", "counter",
                   "HTTP/2 streams whose totals found no room in the kernel map (then counted in user space).")
        m.set("infersight.kernel.h2.stream_map.full", k["h2_stream_full"])
        # request phases none of whose records arrived: lost, counted by the kernel
        m.describe("infersight.requests.lost", "counter", "Requests seen but not recorded, by reason.")
        m.set("infersight.requests.lost", k["unreported"], (("reason", "unreported"),))
        ru = resource.getrusage(resource.RUSAGE_SELF)
        m.set("infersight.process.cpu.seconds", ru.ru_utime + ru.ru_stime)


def _named(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread the kernel shows as ``name`` (bench.threads reads them apart)."""
    procfs.name_thread(name)
    fn()
