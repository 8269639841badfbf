"""Loader for probes/sockets.bpf.c: the thin privileged edge of the capture path.

It compiles and attaches the probe, keeps the target-PID and connection maps,
and drains the ring buffer on a timer, handing raw records in batches to a
callback. Decoding and everything after it happen elsewhere, without root.

Threading: ``drain()`` is called from one thread (the pipeline's drain thread).
``add_target``/``remove_target``/``seed_conn``/``delete_conn``/``counters`` may be
called from any thread; BCC map operations are single syscalls.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import platform
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import procfs
from agent.selfmetrics import SELF_METRICS, SelfMetrics
from probes.compile import compile_bpf
from probes.socket_events import BATCH_SIZE, COUNTER_NAMES, DATA_HEADER, Layout

try:  # records taken from the ring buffer in C (probes/_ringdrain.c); else a ctypes callback
    from probes import _ringdrain
except ImportError:
    _ringdrain = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parent
SOURCE = PROBE_DIR / "sockets.bpf.c"
H2_SOURCE = PROBE_DIR / "h2.bpf.c"
COMMON = PROBE_DIR / "sockets_common.bpf.h"
# Tables the capture module exports to the HTTP/2 module are named "<name>__S"
# in the C sources; each probe instance gives them its own suffix.
_INSTANCES = itertools.count()


def module_text(source: Path, instance: int) -> str:
    """A module's C text as compiled: the shared part, then its own."""
    text = COMMON.read_text() + f'\n#line 1 "{source.name}"\n' + source.read_text()
    return text.replace("__S", f"_{instance}")

# syscall tracepoints the probe needs, in pairs (sched ones are checked too)
SYSCALLS = (
    "accept",
    "accept4",
    "connect",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "sendfile64",
    "splice",
    "close",
    "listen",
    "getpeername",
    "getsockname",
)
SCHED = ("sched_process_exec", "sched_process_fork", "sched_process_exit")


@dataclass(frozen=True)
class SocketProbeConfig:
    """Sizes and bounds of the socket probe; each becomes a -D cflag."""

    head_cap: int = 2048
    """Bytes captured from the start of each captured syscall (power of 2)."""
    tail_cap: int = 1024
    """Bytes captured from the end of a syscall's data, and the size of a tail-ring slot (power
    of 2): a ring write this long or shorter is kept whole, a longer one as its first
    ``ring_head`` bytes and its end. 1024 keeps the last event of llama.cpp's server whole
    (finish reason, usage and its timings: over 700 bytes); the pool of rings is then
    ``max_streams`` x 9 slots, 19 MiB."""
    tail_slots: int = 8
    """Last response writes of a long stream kept in the kernel (power of 2)."""
    sample_writes: int = 3
    """Response writes per request sent to user space in full (the rest are aggregated). Three
    hold a stream's head, a first event that may carry no output (a role), and the first
    token; the next write goes in the summary as well once the tail ring has moved past it,
    for the streams whose first output comes later."""
    late_sample_writes: int = 8
    """As ``sample_writes``, for requests to the APIs whose streams open with several events
    carrying no output, told in the kernel by the request line (``POST /v1/responses``: the
    created, in-progress, output-item and content-part events; ``POST /v1/messages``:
    message_start, content_block_start and ping)."""
    req_capture: int = 16384
    """Request bytes captured per request before only tails of later reads are sent."""
    max_targets: int = 1024
    """Entries of the target-PID map (processes and their forked children)."""
    max_conns: int = 16384
    """Entries of the per-connection LRU map."""
    max_streams: int = 2048
    """Tail rings in the kernel's pool (power of 2). A streamed response takes the next one at
    its first write past the samples; one still streaming when the pool has gone round takes
    another, losing its earlier slots (counted: ``infersight.kernel.tail_rings.reclaimed``)."""
    max_inflight: int = 8192
    """Threads inside a traced syscall at once."""
    ringbuf_pages: int = 1024
    """Ring buffer size in pages (power of 2): 4 MiB, over 0.1 s (the agent's drain period) of
    records from 10,000 JSON or 2,500 streamed requests a second, with room to spare."""
    wakeup_every: int = 256
    """Records between forced wakeups; the rest are drained on a timer."""
    idle_wait_s: float = 0.25
    """After a drain that found nothing: wait up to this long for the kernel's next forced
    wakeup (every ``wakeup_every`` records, and each new listener, target fork or target exit)
    instead of waking on the drain timer. 0, or a ring buffer too small to hold
    ``wakeup_every`` data records of the largest size: always wake on the timer."""
    trace_clients: bool = False
    """Also trace connections the targets open (client spans)."""
    tls: bool = False
    """Capture TLS plaintext with uprobes on the OpenSSL (libssl) each target maps."""
    native_drain: bool = True
    """Take ring buffer records with probes/_ringdrain.c when it is built (False: BCC's ctypes
    callback, one Python call per record)."""
    exit_args: bool | None = None
    """Read the data syscalls' arguments at their exit from the thread's saved user registers,
    with no entry programs (True), or save them at entry (False). None: at exit where
    :func:`exit_args_supported` says the kernel allows it."""

    ring_head: int = 192
    """Of a long write in the tail ring, bytes kept from its start (the rest from its end)."""
    h2_cap: int = 1024
    """HTTP/2: payload bytes captured per forwarded frame (power of 2)."""
    max_h2_streams: int = 4096
    """HTTP/2: entries of the LRU map of per-stream DATA totals (all connections)."""
    h2_gather: int = 65536
    """HTTP/2: bytes of a vectored syscall gathered per CPU for the frame walk (power of 2)."""

    @property
    def layout(self) -> Layout:
        return Layout(self.head_cap, self.tail_cap, self.tail_slots, self.ring_head, self.h2_cap)

    def cflags(self) -> list[str]:
        for name in ("head_cap", "tail_cap", "tail_slots", "max_streams", "ringbuf_pages", "h2_cap", "h2_gather"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.tail_slots > 16:
            raise ValueError(f"tail_slots must be at most 16, got {self.tail_slots}")
        if not 1 <= self.sample_writes <= self.late_sample_writes:
            raise ValueError(f"need 1 <= sample_writes <= late_sample_writes, got {self.sample_writes} "
                             f"and {self.late_sample_writes}")
        return [
            f"-I{PROBE_DIR}",
            f"-DHEAD_CAP={self.head_cap}",
            f"-DTAIL_CAP={self.tail_cap}",
            f"-DTAIL_SLOTS={self.tail_slots}",
            f"-DRING_HEAD={self.ring_head}",
            f"-DSAMPLE_WRITES={self.sample_writes}",
            f"-DLATE_SAMPLE_WRITES={self.late_sample_writes}",
            f"-DREQ_CAPTURE={self.req_capture}",
            f"-DMAX_TARGETS={self.max_targets}",
            f"-DMAX_CONNS={self.max_conns}",
            f"-DMAX_STREAMS={self.max_streams}",
            f"-DMAX_INFLIGHT={self.max_inflight}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
            f"-DWAKEUP_EVERY={self.wakeup_every}",
            f"-DTRACE_CLIENTS={int(self.trace_clients)}",
            f"-DTLS={int(self.tls)}",
            f"-DH2_CAP={self.h2_cap}",
            f"-DMAX_H2_STREAMS={self.max_h2_streams}",
            f"-DH2_GATHER={self.h2_gather}",
            f"-DNCPU={possible_cpus()}",
            "-Wno-unused-function",
        ]


def possible_cpus() -> int:
    """Entries of per-CPU buffers kept in plain arrays: the highest possible CPU id + 1."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


# BPF instructions (struct bpf_insn): code, dst/src registers, offset, immediate
def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_BPF_PROG_LOAD = 5
_PROG_TYPE_TRACEPOINT = 5
_FUNC_GET_CURRENT_TASK_BTF = 158
_FUNC_TASK_PT_REGS = 175
_NR_BPF_X86_64 = 321


def exit_args_supported() -> tuple[bool, str]:
    """Whether the data syscalls' arguments can be read at exit (sockets.bpf.c, EXIT_ARGS):
    an x86_64 kernel whose verifier accepts a tracepoint program that does what the probe
    does, bpf_task_pt_regs(bpf_get_current_task_btf()) and loads of the saved rdx, rsi and
    rdi. That program (eight instructions) is loaded and closed: no clang, about a
    millisecond. The second value says how, or why not."""
    if platform.machine() != "x86_64":
        return False, f"saved-register layout known for x86_64 only, this is {platform.machine()}"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return False, "no kernel BTF (/sys/kernel/btf/vmlinux)"
    prog = (_insn(0x85, imm=_FUNC_GET_CURRENT_TASK_BTF)  # call bpf_get_current_task_btf
            + _insn(0xBF, dst=1, src=0)                  # r1 = r0
            + _insn(0x85, imm=_FUNC_TASK_PT_REGS)        # call bpf_task_pt_regs
            + _insn(0x79, dst=1, src=0, off=96)          # r1 = regs->dx
            + _insn(0x79, dst=1, src=0, off=104)         # r1 = regs->si
            + _insn(0x79, dst=1, src=0, off=112)         # r1 = regs->di
            + _insn(0xB7, dst=0, imm=0)                  # r0 = 0
            + _insn(0x95))                               # exit
    insns = ctypes.create_string_buffer(prog, len(prog))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)  # union bpf_attr, BPF_PROG_LOAD's leading fields
    struct.pack_into("<IIQQ", attr, 0, _PROG_TYPE_TRACEPOINT, len(prog) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_BPF_X86_64, _BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM and os.geteuid() != 0:
            return False, "no permission to load BPF programs (run as root or with CAP_BPF + CAP_PERFMON)"
        return False, f"the kernel refused bpf_task_pt_regs in a tracepoint program ({os.strerror(err)})"
    os.close(fd)
    return True, "bpf_task_pt_regs"


def ring_buffer_poller(manager: Any) -> select.poll | None:
    """A poll object on the epoll descriptor of BCC's ring buffer manager (a libbpf
    ``struct ring_buffer``), readable when the kernel wakes the ring buffer's readers.
    None where libbpf's ``ring_buffer__epoll_fd`` cannot be called."""
    if not manager:
        return None
    try:
        fn = ctypes.CDLL("libbpf.so.1").ring_buffer__epoll_fd
    except (OSError, AttributeError) as e:
        log.info("ring buffer wait: libbpf's ring_buffer__epoll_fd unavailable (%s); an idle agent "
                 "wakes on the drain timer", e)
        return None
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    fd = fn(manager)
    if fd < 0:
        log.info("ring buffer wait: no epoll descriptor (%d); an idle agent wakes on the drain timer", fd)
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller


def missing_tracepoints() -> list[str]:
    """Tracepoints the probe needs that this kernel lacks (a feature test)."""
    from bcc import BPF

    missing = []
    for sc in SYSCALLS:
        for side in ("enter", "exit"):
            if sc == "close" and side == "exit":
                continue
            if sc == "listen" and side == "enter":
                continue
            if not BPF.tracepoint_exists("syscalls", f"sys_{side}_{sc}"):
                missing.append(f"syscalls:sys_{side}_{sc}")
    for tp in SCHED:
        if not BPF.tracepoint_exists("sched", tp):
            missing.append(f"sched:{tp}")
    return missing


class SocketProbe:
    """The loaded socket probe. Raises from ``__init__`` when BCC cannot
    compile, load or attach it (the error names what failed)."""

    def __init__(
        self,
        config: SocketProbeConfig = SocketProbeConfig(),
        *,
        on_records: Callable[[bytes], None],
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        from bcc import BPF

        self.config = config
        self._metrics = metrics
        self._on_records = on_records
        self._batch: list[bytes] = []  # the ctypes callback's: each record's size, then its bytes
        # connections user space put into / took out of the map (for the eviction count)
        self.seeded = 0
        self.deleted = 0
        missing = missing_tracepoints()
        # sendfile64/splice are optional (they only keep timing right); the rest are not.
        hard = [m for m in missing if "sendfile64" not in m and "splice" not in m]
        if hard:
            raise RuntimeError(f"kernel lacks tracepoints: {', '.join(hard)}")
        t0 = time.monotonic()
        self._instance = next(_INSTANCES)
        if config.exit_args is None:
            self.exit_args, why = exit_args_supported()
        else:
            self.exit_args, why = config.exit_args, "as configured"
        log.info("data syscall arguments %s (%s)", "read at exit" if self.exit_args else "saved at entry", why)
        self.bpf = compile_bpf(text=module_text(SOURCE, self._instance).encode(),
                               cflags=[*config.cflags(), f"-DEXIT_ARGS={int(self.exit_args)}"])
        # accept and accept4 end in one program (their exits' fields are the same)
        self.bpf.attach_tracepoint(tp=b"syscalls:sys_exit_accept4", fn_name=b"tracepoint__syscalls__sys_exit_accept")
        # the data syscalls' exits tail-call this one program (see finish() in the C file)
        data_exit = self.bpf.load_func(b"data_exit", BPF.TRACEPOINT)
        self.bpf[self._t("data_exit_prog")][ctypes.c_int(0)] = ctypes.c_int(data_exit.fd)
        self._tls_libs: dict[tuple[int, int], bool] = {}  # (dev, inode) of a libssl -> hooked
        self._tls_exes: dict[tuple[int, int], str] = {}  # (dev, inode) of an executable -> TLS state
        self.load_seconds = time.monotonic() - t0
        self._targets = self.bpf[self._t("targets")]
        self._target_gens = self.bpf[self._t("target_gens")]
        self._gen_lock = threading.Lock()
        self._user_gen = 0
        self._conns = self.bpf[self._t("conns")]
        self._counters = self.bpf[self._t("counters")]
        events = self.bpf[self._t("events")]
        self._consume: int | None = None
        if config.native_drain and _ringdrain is not None:
            # the C callback packs each record into the batch that one C call, draining them
            # all, returns
            from bcc import libbcc

            cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
            self._cb: Any = cb_type(_ringdrain.callback_address())
            self.bpf._open_ring_buffer(events.map_fd, self._cb, None)
            self._consume = ctypes.cast(libbcc.lib.bpf_consume_ringbuf, ctypes.c_void_p).value
        else:
            batch_append = self._batch.append
            string_at = ctypes.string_at
            size_of = BATCH_SIZE.pack

            def _cb(_ctx: Any, data: Any, size: int) -> int:
                batch_append(size_of(size))
                batch_append(string_at(data, size))
                return 0

            self._cb = _cb  # keep a reference: BCC holds only a ctypes pointer
            events.open_ring_buffer(_cb)
        self.native_drain = self._consume is not None
        # An idle agent sleeps on the ring buffer's epoll descriptor (libbpf's) between
        # forced wakeups; without it, it wakes on the drain timer even when idle.
        self._idle = False
        self._idle_poll: select.poll | None = None
        if config.idle_wait_s > 0:
            # Waiting for the forced wakeup is safe where the records before it fit in the ring
            # buffer (a response's summary, larger, comes after two data records at least).
            largest = DATA_HEADER.size + config.head_cap + config.tail_cap
            if config.ringbuf_pages * os.sysconf("SC_PAGE_SIZE") >= config.wakeup_every * largest:
                self._idle_poll = ring_buffer_poller(self.bpf._ringbuf_manager)
            else:
                log.info("ring buffer wait: %d pages hold fewer than %d data records; an idle agent wakes "
                         "on the drain timer", config.ringbuf_pages, config.wakeup_every)
        metrics.set("infersight.probe.load.seconds", self.load_seconds, (("probe", "sockets"),))
        # The HTTP/2 walk compiles and loads in the background once the caller
        # has attached (start_h2): start-up does not wait for it, and no
        # connection enters h2 mode until it is in place. With TLS capture on,
        # the uprobes' data path (the TLS module) is compiled there first: the
        # libssl hooks asked for before it is in place are placed then.
        self.h2bpf: Any = None
        self.h2_ready = threading.Event()
        self.tlsbpf: Any = None
        self.tls_ready = threading.Event()
        self._tls_lock = threading.Lock()
        self._tls_pending: list[str] = []  # libssl paths to hook once the TLS module is loaded
        self._tls_failed = False
        self._h2_thread = threading.Thread(target=self._load_late, name="infersight-bpf", daemon=True)
        self._h2_lock = threading.Lock()

    def _t(self, name: str) -> bytes:
        """The name of a table shared with the HTTP/2 and TLS modules, in this instance."""
        return f"{name}_{self._instance}".encode()

    def _load_late(self) -> None:
        # named for the kernel as well, so that top -H and bench.threads show the compiles apart
        procfs.name_thread("infersight-bpf")
        # The compiles are a one-off burst of CPU: at the lowest priority they take
        # what the traced servers leave (Linux: a thread's own nice value).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        if self.config.tls:
            self._load_tls()
        self._load_h2()

    def _load_tls(self) -> None:
        """Compile and load the uprobes' copy of the data path (sockets.bpf.c with
        TLS_MODULE, on the capture module's tables), then place the hooks asked for."""
        from bcc import BPF

        t0 = time.monotonic()
        try:
            tls = compile_bpf(text=module_text(SOURCE, self._instance).encode(),
                              cflags=[*self.config.cflags(), f"-DEXIT_ARGS={int(self.exit_args)}", "-DTLS_MODULE"])
            # the data path, as a program of the uprobes' type (tail calls keep program types)
            self.bpf[self._t("data_exit_uprobe_prog")][ctypes.c_int(0)] = ctypes.c_int(
                tls.load_func(b"data_exit_uprobe", BPF.KPROBE).fd)
        except Exception:
            log.exception("TLS capture could not be loaded; HTTPS requests are not captured")
            self._metrics.inc("infersight.probe.errors", labels=(("probe", "tls"),))
            with self._tls_lock:
                self._tls_failed = True
                self._tls_pending.clear()
            self.tls_ready.set()
            return
        with self._tls_lock:
            self.tlsbpf = tls
            pending, self._tls_pending = self._tls_pending, []
            for path in pending:
                self._place_tls_hooks(path)
        self.tls_ready.set()
        self._metrics.set("infersight.probe.load.seconds", time.monotonic() - t0, (("probe", "tls"),))
        log.info("TLS capture ready (%.2f s after the probe)", time.monotonic() - t0)

    def wait_tls(self, timeout: float = 60.0) -> bool:
        """Wait for the TLS module to be loaded and the hooks asked for so far placed (starting
        the background load if need be); True when it is in place."""
        if not self.config.tls:
            return False
        self.start_h2()
        self.tls_ready.wait(timeout)
        return self.tlsbpf is not None

    def _load_h2(self) -> None:
        from bcc import BPF

        t0 = time.monotonic()
        try:
            h2 = compile_bpf(text=module_text(H2_SOURCE, self._instance).encode(),
                             cflags=[*self.config.cflags(), "-DH2_MODULE"])
            h2[b"h2_step_prog"][ctypes.c_int(0)] = ctypes.c_int(h2.load_func(b"h2_step", BPF.TRACEPOINT).fd)
            h2[b"h2_gather_prog"][ctypes.c_int(0)] = ctypes.c_int(
                h2.load_func(b"h2_gather_step", BPF.TRACEPOINT).fd)
            if self.config.tls:
                h2[b"h2_step_uprobe_prog"][ctypes.c_int(0)] = ctypes.c_int(
                    h2.load_func(b"h2_step_uprobe", BPF.KPROBE).fd)
                self.bpf[self._t("data_exit_uprobe_prog")][ctypes.c_int(1)] = ctypes.c_int(
                    h2.load_func(b"h2_exit_uprobe", BPF.KPROBE).fd)
            self.bpf[self._t("data_exit_prog")][ctypes.c_int(1)] = ctypes.c_int(
                h2.load_func(b"h2_exit", BPF.TRACEPOINT).fd)
            self.h2bpf = h2
            self.bpf[self._t("h2_ready")][ctypes.c_int(0)] = ctypes.c_uint32(1)
        except Exception:
            log.exception("HTTP/2 capture could not be loaded; HTTP/2 connections are counted as non-HTTP")
            self._metrics.inc("infersight.probe.errors", labels=(("probe", "h2"),))
            return
        finally:
            self.h2_ready.set()
        self._metrics.set("infersight.probe.load.seconds", time.monotonic() - t0, (("probe", "h2"),))
        log.info("HTTP/2 capture ready (%.2f s after the probe)", time.monotonic() - t0)

    def start_h2(self) -> None:
        """Compile and load the HTTP/2 walk in a background thread (once)."""
        with self._h2_lock:
            if not self._h2_thread.is_alive() and not self.h2_ready.is_set():
                self._h2_thread.start()

    def wait_h2(self, timeout: float = 60.0) -> bool:
        """Wait for the HTTP/2 walk to be loaded (starting it if need be); True when it is in place."""
        self.start_h2()
        self.h2_ready.wait(timeout)
        return self.h2bpf is not None

    # ---- targets and connections -------------------------------------------------
    def add_target(self, pid: int) -> None:
        self._targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        self._targets_changed()

    def remove_target(self, pid: int) -> None:
        try:
            del self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            return
        self._targets_changed()

    def _targets_changed(self) -> None:
        """Bump user space's generation of the target table: the kernel's remembered answers
        of the target filter (``target_answer``, one per CPU) are asked again."""
        with self._gen_lock:
            self._user_gen += 1
            self._target_gens[ctypes.c_int(0)] = ctypes.c_uint64(self._user_gen)

    def targets(self) -> set[int]:
        return {k.value for k in self._targets.keys()}

    def seed_conn(self, pid: int, fd: int, role: int, conn_id: int) -> bool:
        """Track a socket that was open before the probe attached. Does not
        replace a connection the probe already tracks. True when inserted."""
        key = self._conns.Key((pid << 32) | fd)
        leaf = self._conns.Leaf()
        leaf.conn_id = conn_id
        leaf.role = role
        # BPF_NOEXIST = 1: never clobber state the kernel created meanwhile
        from bcc import lib

        rc = lib.bpf_update_elem(self._conns.map_fd, ctypes.byref(key), ctypes.byref(leaf), 1)
        if rc == 0:
            self.seeded += 1
        return rc == 0

    def conn_alive(self, pid: int, fd: int, conn_id: int) -> bool:
        """Whether the kernel still tracks this connection (same generation)."""
        try:
            leaf = self._conns[self._conns.Key((pid << 32) | fd)]
        except KeyError:
            return False
        return bool(leaf.conn_id == conn_id)

    def attach_tls(self, pid: int, proc: str = "/proc") -> str:
        """Hook the OpenSSL library ``pid`` maps, once per library file, or the
        OpenSSL/BoringSSL its executable links statically. Returns the process's
        TLS capture state: ``hooked`` (its libssl is hooked), ``unhooked`` (it has
        TLS that cannot be hooked: GnuTLS, NSS, wolfSSL, a libssl without the
        symbols, or Go's crypto/tls linked into the executable) or ``none`` (no
        TLS library found)."""
        if not self.config.tls:
            return "none"
        exe_state = self._exe_tls(pid, proc)
        try:
            with open(f"{proc}/{pid}/maps") as f:
                paths = {line.split()[-1] for line in f if "/" in line}
        except OSError:
            return "none"
        state = "none"
        for path in sorted(paths):
            base = os.path.basename(path)
            if base.startswith(("libgnutls", "libnss3", "libwolfssl")):
                state = "unhooked" if state == "none" else state
                continue
            if not base.startswith("libssl.so"):
                continue
            real = f"{proc}/{pid}/root{path}"
            try:
                st = os.stat(real)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in self._tls_libs:
                self._tls_libs[key] = self._hook_libssl(real)
            state = "hooked" if self._tls_libs[key] else ("unhooked" if state == "none" else state)
        if exe_state == "hooked" or (exe_state == "unhooked" and state == "none"):
            state = exe_state
        return state

    # Symbols of TLS linked into an executable: OpenSSL/BoringSSL's entry points
    # (hookable like a libssl), or Go's crypto/tls (its own ABI: not hooked).
    _STATIC_TLS = rb"^(SSL_read|SSL_write|SSL_read_ex|SSL_write_ex|crypto/tls\.\(\*Conn\)\.(Read|Write))$"

    def _exe_tls(self, pid: int, proc: str) -> str:
        from bcc import BPF

        real = f"{proc}/{pid}/exe"
        try:
            st = os.stat(real)
        except OSError:
            return "none"
        key = (st.st_dev, st.st_ino)
        if key in self._tls_exes:
            return self._tls_exes[key]
        try:
            syms = {name for name, _ in BPF.get_user_functions_and_addresses(real.encode(), self._STATIC_TLS)}
        except Exception:
            syms = set()
        if b"SSL_read" in syms or b"SSL_write" in syms:
            state = "hooked" if self._hook_libssl(real) else "unhooked"
        elif syms:
            state = "unhooked"
            self._metrics.inc("infersight.tls.static", labels=(("library", "go"),))
            log.info("pid %d: Go crypto/tls in its executable; its TLS traffic is not captured", pid)
        else:
            state = "none"
        self._tls_exes[key] = state
        return state

    _SSL_SYMBOLS = ((b"SSL_read", b"ssl_read_enter"), (b"SSL_write", b"ssl_write_enter"),
                    (b"SSL_read_ex", b"ssl_read_ex_enter"), (b"SSL_write_ex", b"ssl_write_ex_enter"))

    def _hook_libssl(self, path: str) -> bool:
        """Hook a libssl (or an executable linking OpenSSL): now where the TLS module is
        loaded, else once it is, where the file has the symbols (True: hooked or to be)."""
        with self._tls_lock:
            if self.tlsbpf is not None:
                return self._place_tls_hooks(path)
            if self._tls_failed:
                self._metrics.inc("infersight.tls.libraries.unhooked")
                return False
            from bcc import BPF

            try:
                found = BPF.get_user_functions_and_addresses(path.encode(), rb"^SSL_(read|write)(_ex)?$")
            except Exception:
                found = []
            if not found:
                for sym, _ in self._SSL_SYMBOLS:
                    self._metrics.inc("infersight.tls.symbols.missing", labels=(("symbol", sym.decode()),))
                self._metrics.inc("infersight.tls.libraries.unhooked")
                return False
            self._tls_pending.append(path)
            return True

    def _place_tls_hooks(self, path: str) -> bool:
        hooked = 0
        for sym, enter in self._SSL_SYMBOLS:
            try:
                self.tlsbpf.attach_uprobe(name=path.encode(), sym=sym, fn_name=enter)
                self.tlsbpf.attach_uretprobe(name=path.encode(), sym=sym, fn_name=b"ssl_return")
                hooked += 1
            except Exception:
                self._metrics.inc("infersight.tls.symbols.missing", labels=(("symbol", sym.decode()),))
        if hooked:
            log.info("TLS plaintext capture on %s (%d functions)", path, hooked)
            self._metrics.inc("infersight.tls.libraries.hooked")
        else:
            self._metrics.inc("infersight.tls.libraries.unhooked")
        return hooked > 0

    def conn_keys(self) -> list[tuple[int, int]]:
        """(pid, fd) of every tracked connection (walks the map)."""
        return [(k.value >> 32, k.value & 0xFFFFFFFF) for k in self._conns.keys()]

    def delete_conn(self, pid: int, fd: int) -> None:
        key = self._conns.Key((pid << 32) | fd)
        try:
            del self._conns[key]
            self.deleted += 1
        except KeyError:
            pass

    # ---- draining ---------------------------------------------------------------
    def drain(self, timeout_ms: int) -> int:
        """Wait ``timeout_ms`` (after a drain that found nothing: up to the idle wait, until
        the kernel forces a wakeup), then take every record in the ring buffer and pass them,
        as one batch (packed: ``probes.socket_events.pack``), to ``on_records``. Returns the
        number of records."""
        # A plain sleep, not ring_buffer_poll: the kernel reports a ring buffer
        # readable for as long as it holds data (level-triggered), so under a
        # steady load the poll returns at once, every time, and the timed drain
        # turns into a busy loop that takes the GIL from the assembly.
        # Once a drain finds the ring empty, though, the poll returns only on a
        # forced wakeup (records go out without one), or after the idle wait.
        if self._idle and self._idle_poll is not None and timeout_ms > 0:
            self._idle_poll.poll(max(timeout_ms, int(self.config.idle_wait_s * 1000)))
        else:
            time.sleep(timeout_ms / 1000)
        if self._consume is not None:
            rc, packed = _ringdrain.consume(self._consume, self.bpf._ringbuf_manager)
            n = max(rc, 0)
        else:
            self.bpf.ring_buffer_consume()
            n = len(self._batch) // 2
            packed = b"".join(self._batch)
            self._batch.clear()
        self._idle = not packed
        if packed:
            self._on_records(packed)
        return n

    def counters(self) -> dict[str, int]:
        """Per-CPU kernel counters, summed."""
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            vals = self._counters[ctypes.c_int(i)]
            out[name] = int(sum(vals))
        return out

    def conn_evictions(self, entries: int) -> int:
        """Connections the LRU map evicted (BPF LRU maps evict silently): every
        connection put in (by accept/connect, or seeded) and not taken out (at
        close, by a new connection on its fd number, or by user space) nor still
        present. ``entries``: a fresh count."""
        k = self.counters()
        return max(0, k["conns"] + self.seeded - k["closed"] - k["replaced"] - self.deleted - entries)

    def map_entries(self) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) per map. Walks each map: call at most every few seconds."""
        out = {}
        for name in ("targets", "conns", "inflight", "h2streams"):  # tails is an array, a pool taken in turn
            if name == "h2streams":
                if self.h2bpf is None:
                    continue
                table = self.h2bpf[b"h2streams"]
            else:
                table = self.bpf[self._t(name)]
            n = sum(1 for _ in table.keys())
            out[name] = (n, int(table.max_entries))
        return out

    def close(self) -> None:
        with self._h2_lock:
            started = self._h2_thread.ident is not None
        if started:
            self._h2_thread.join()
        if self.h2bpf is not None:
            self.h2bpf.cleanup()
        if self.tlsbpf is not None:
            self.tlsbpf.cleanup()
        self.bpf.cleanup()
