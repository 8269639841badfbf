"""The CUDA probe against stub CUDA libraries, with real uprobes.

The stubs (tests/cuda_stub/) export the real driver and runtime signatures;
the pattern program calls them a known number of times with known sizes, so
every count and byte is asserted exactly, per process. A second copy of the
program runs untraced at the same time and must not be counted.
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.export.instruments import SOURCE_ERRORS, MetricState, ScalarPoint
from agent.export.routes import AttributeBounds
from agent.selfmetrics import SelfMetrics
from probes import cuda
from probes.cuda import (
    CUDA_SYNC_HIST_SLOTS,
    LAYOUT,
    SYNC_BOUNDS_S,
    CudaBucket,
    CudaProbe,
    CudaProbeConfig,
    CudaWindow,
    parse_maps,
    summarise,
)
from tests.cuda_stub.build import StubBuild, build

BUCKET_NS = 200_000_000
SYNC_US = 20_000  # each stub synchronize sleeps this long
TIMEOUT_S = 30.0


def wait_until(cond: Callable[[], object], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll ``cond`` every 20 ms until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------ pure parts


MAPS = """\
5581d8a00000-5581d8a02000 r--p 00000000 fd:01 1311 /usr/bin/python3.11
7f1c00000000-7f1c00200000 r--p 00000000 fd:01 4242 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f1c00200000-7f1c01200000 r-xp 00200000 fd:01 4242 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f1c02000000-7f1c02100000 r-xp 00000000 00:2f 99 /opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f1c03000000-7f1c03100000 r-xp 00000000 00:2f 100 /opt/venv/lib/python3.11/site-packages/torch/lib/libcudart-9335f6a2.so.12
7f1c04000000-7f1c04100000 r-xp 00000000 00:2f 101 /opt/venv/lib/python3.11/site-packages/torch/lib/libcudnn.so.9
7f1c05000000-7f1c05100000 r-xp 00000000 00:2f 102 /opt/app/lib/libcudart.so.12 (deleted)
7f1c06000000-7f1c06100000 r-xp 00000000 00:2f 103 /opt/app/lib/libcudart_static.a.so
7f1c07000000-7f1c07100000 r-xp 00000000 00:2f 104 /opt/my dir/libcuda.so.1
7ffc8e5f0000-7ffc8e611000 rw-p 00000000 00:00 0 [stack]
garbage line
"""


def test_parse_maps_finds_each_cuda_library_once() -> None:
    libs = {(m.kind, m.dev, m.inode, m.path) for m in parse_maps(MAPS)}
    assert libs == {
        ("driver", "fd:01", 4242, "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
        ("runtime", "00:2f", 99, "/opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"),
        ("runtime", "00:2f", 100, "/opt/venv/lib/python3.11/site-packages/torch/lib/libcudart-9335f6a2.so.12"),
        ("driver", "00:2f", 104, "/opt/my dir/libcuda.so.1"),
    }


def test_summarise_adds_buckets_and_spans_them() -> None:
    hist_a = tuple(1 if i == 3 else 0 for i in range(CUDA_SYNC_HIST_SLOTS))
    hist_b = tuple(2 if i in (3, 5) else 0 for i in range(CUDA_SYNC_HIST_SLOTS))
    a = CudaBucket(7, 1_000, 1, 2, 3, 4, 5, 6, 7, 8, 9, hist_a, memcpy_other_bytes=10)
    b = CudaBucket(7, 3_000, 10, 20, 30, 40, 50, 60, 70, 80, 90, hist_b, memcpy_other_bytes=100)
    w = summarise(7, [a, b], 1_000)
    assert w == CudaWindow(
        pid=7, start_unix_nano=1_000, end_unix_nano=4_000, buckets=2, launches=11, graph_launches=22,
        alloc_bytes=33, free_bytes=44, memcpy_htod_bytes=55, memcpy_dtoh_bytes=66, memcpy_dtod_bytes=77,
        memcpy_other_bytes=110, sync_calls=88, sync_ns=99,
        sync_hist=tuple(3 if i == 3 else 2 if i == 5 else 0 for i in range(CUDA_SYNC_HIST_SLOTS)),
    )
    assert summarise(7, [], 1_000) is None


def test_config_rejects_non_positive_bounds() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        CudaProbeConfig(max_buckets=0)


def test_sync_bounds_are_the_log2_slots_in_seconds() -> None:
    assert len(SYNC_BOUNDS_S) == CUDA_SYNC_HIST_SLOTS - 1
    assert SYNC_BOUNDS_S[:3] == (1e-6, 2e-6, 4e-6)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> StubBuild:
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    return build(tmp_path_factory.mktemp("cuda_stub"))


@dataclass(frozen=True)
class Pattern:
    launches: int = 10
    graphs: int = 3
    allocs: int = 5
    alloc_size: int = 1 << 20
    htod: int = 4096
    dtoh: int = 8192
    dtod: int = 12288
    other: int = 512
    syncs: int = 4

    def args(self) -> list[str]:
        return [str(v) for v in (self.launches, self.graphs, self.allocs, self.alloc_size, self.htod, self.dtoh,
                                 self.dtod, self.other, self.syncs)]

    def expected(self, api: str) -> dict[str, int]:
        """What the probe must count for one run of app.c's pattern (see its header)."""
        return {
            "launches": self.launches,
            "graph_launches": self.graphs,
            "alloc_bytes": self.allocs * self.alloc_size,
            "free_bytes": (self.allocs - 1) * self.alloc_size,
            "memcpy_htod_bytes": 2 * self.htod,
            "memcpy_dtoh_bytes": 2 * self.dtoh,
            "memcpy_dtod_bytes": (2 if api == "runtime" else 1) * self.dtod,
            "memcpy_other_bytes": 2 * self.other if api == "runtime" else 0,
            "sync_calls": self.syncs,
        }


class App:
    """One run of tests/cuda_stub/app.c, driven through files in its own control dir."""

    def __init__(self, argv_prefix: list[str], ctl: Path, api: str, lib: str, pattern: Pattern,
                 env: dict[str, str]) -> None:
        ctl.mkdir(parents=True)
        self.ctl = ctl
        self.proc = subprocess.Popen([*argv_prefix, str(ctl), api, lib, *pattern.args()],
                                     env={**os.environ, "STUB_SYNC_US": str(SYNC_US), **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        self.wait_file("ready")

    def wait_file(self, name: str) -> None:
        def there() -> bool:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                pytest.fail(f"app exited with {self.proc.returncode} before {name}: {out}")
            return (self.ctl / name).exists()

        wait_until(there, f"{self.ctl}/{name}")

    def signal(self, name: str) -> None:
        (self.ctl / name).touch()

    def run_pattern(self) -> None:
        self.signal("go")
        assert self.proc.wait(timeout=TIMEOUT_S) == 0, self.proc.stdout.read() if self.proc.stdout else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Callable[..., App]]:
    started: list[App] = []

    def start(api: str, pattern: Pattern, *, stubs: StubBuild, lib: str = "-", prefix: list[str] | None = None,
              libdir: Path | None = None) -> App:
        argv = prefix or [str(stubs.app if lib == "-" else stubs.app_dlopen)]
        app = App(argv, tmp_path / f"ctl{len(started)}", api, lib, pattern,
                  {"LD_LIBRARY_PATH": str(libdir or stubs.dir)})
        started.append(app)
        return app

    yield start
    for app in started:
        app.kill()


@pytest.fixture
def metrics() -> SelfMetrics:
    return SelfMetrics()


@pytest.fixture
def make_probe(metrics: SelfMetrics) -> Iterator[Callable[..., CudaProbe]]:
    made: list[CudaProbe] = []

    def make(proc: str = "/proc", **overrides: int | float) -> CudaProbe:
        config = CudaProbeConfig(**{"bucket_ns": BUCKET_NS, **overrides})  # type: ignore[arg-type]
        probe = CudaProbe(config, metrics=metrics, proc=proc)
        assert probe.enabled, "BPF program failed to load"
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.stop()


def kinds(probe: CudaProbe, pid: int) -> set[str]:
    return {lib.kind for lib in probe.libraries(pid)}


def read_all(probe: CudaProbe, done_mono_ns: int) -> list[CudaBucket]:
    """Every bucket, through the ordinary (non-flush) poll: wait until the last
    bucket the program could have touched has ended and settled."""
    c = probe.config
    out: list[CudaBucket] = []
    last_complete = done_mono_ns + c.bucket_ns + c.settle_ns
    wait_until(lambda: time.monotonic_ns() > last_complete, "the last bucket to complete", timeout=5)
    out.extend(probe.poll())
    assert probe.poll(flush=True) == [], "a bucket of the finished run was still in the kernel"
    return out


def window_counts(w: CudaWindow | None) -> dict[str, int]:
    """The counters a window holds that Pattern.expected names."""
    assert w is not None, "no buckets in the window"
    return {name: getattr(w, name) for name in Pattern().expected("runtime")}


def totals(buckets: list[CudaBucket], pid: int) -> dict[str, int]:
    return window_counts(summarise(pid, [b for b in buckets if b.pid == pid], BUCKET_NS))


def assert_sync_hist(buckets: list[CudaBucket], pid: int, syncs: int) -> None:
    """Every wait was at least SYNC_US: no count below SYNC_US's slot, all counted, sum consistent."""
    w = summarise(pid, [b for b in buckets if b.pid == pid], BUCKET_NS)
    assert w is not None
    slot = SYNC_US.bit_length()  # slot k holds 2**(k-1) <= us < 2**k
    assert sum(w.sync_hist) == syncs
    assert sum(w.sync_hist[:slot]) == 0, w.sync_hist
    assert w.sync_ns >= syncs * SYNC_US * 1000
    # and none absurdly long (a stub sleep that took over 4 s means the clock math is wrong)
    assert sum(w.sync_hist[slot + 8:]) == 0, w.sync_hist


# ------------------------------------------------------------------ real uprobes


def test_layout_and_constants_match_the_c_header(stubs: StubBuild) -> None:
    out = subprocess.run([str(stubs.sizes)], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert {name: int(v) for kind, name, v in rows if kind == "struct"} == {
        name: ct.sizeof(t) for name, t in LAYOUT.items()
    }
    consts = {name: int(v) for kind, name, v in rows if kind == "const"}
    assert len(consts) == 9
    assert consts == {name: getattr(cuda, name) for name in consts}


@pytest.mark.ebpf
def test_layout_matches_the_bpf_object(make_probe: Callable[..., CudaProbe]) -> None:
    bpf = make_probe()._bpf  # the BPF object's own idea of the table types, from its debug info
    assert ct.sizeof(bpf[b"buckets"].Key) == ct.sizeof(LAYOUT["cuda_bucket_key"])
    assert ct.sizeof(bpf[b"buckets"].Leaf) == ct.sizeof(LAYOUT["cuda_bucket"])
    assert ct.sizeof(bpf[b"allocs"].Key) == ct.sizeof(LAYOUT["cuda_alloc_key"])
    assert ct.sizeof(bpf[b"calls"].Leaf) == ct.sizeof(LAYOUT["cuda_call"])


@pytest.mark.ebpf
@pytest.mark.parametrize("api", ["driver", "runtime"])
def test_exact_counts_per_process(api: str, stubs: StubBuild, apps: Callable[..., App],
                                  make_probe: Callable[..., CudaProbe], metrics: SelfMetrics) -> None:
    pattern = Pattern()
    probe = make_probe()
    traced = apps(api, pattern, stubs=stubs)
    untraced = apps(api, Pattern(launches=7, allocs=3, syncs=2), stubs=stubs)
    probe.add_pid(traced.pid)
    assert kinds(probe, traced.pid) == {"driver", "runtime"}  # both are linked in

    untraced.run_pattern()
    traced.run_pattern()
    buckets = read_all(probe, time.monotonic_ns())

    assert totals(buckets, traced.pid) == pattern.expected(api)
    assert_sync_hist(buckets, traced.pid, pattern.syncs)
    assert not [b for b in buckets if b.pid == untraced.pid]
    assert {b.pid for b in buckets} == {traced.pid}
    # the traced program's free of a pointer it never allocated
    assert metrics.get("infersight.cuda.frees.untracked") == 1
    assert metrics.total("infersight.cuda.updates.lost") == 0
    assert metrics.total("infersight.cuda.map.evictions") == 0


@pytest.mark.ebpf
def test_missing_symbols_are_counted_per_library(stubs: StubBuild, apps: Callable[..., App],
                                                 make_probe: Callable[..., CudaProbe],
                                                 metrics: SelfMetrics) -> None:
    probe = make_probe()
    app = apps("driver", Pattern(), stubs=stubs)
    probe.add_pid(app.pid)
    libs = {lib.kind: lib for lib in probe.libraries(app.pid)}
    assert libs["driver"].missing == ("cuMemcpyDtoDAsync_v2",)
    assert libs["runtime"].missing == ("cudaLaunchKernelExC", "cudaMallocAsync", "cudaFreeAsync")
    assert libs["driver"].failed == libs["runtime"].failed == ()
    assert libs["driver"].inode == stubs.libcuda.stat().st_ino
    assert metrics.get("infersight.cuda.symbols.missing", (("library", "driver"),)) == 1
    assert metrics.get("infersight.cuda.symbols.missing", (("library", "runtime"),)) == 3
    assert metrics.get("infersight.cuda.libraries.attached", (("library", "driver"),)) == 1
    assert metrics.total("infersight.cuda.attach.failures") == 0

    # A second process mapping the same files attaches nothing new.
    other = apps("driver", Pattern(), stubs=stubs)
    probe.add_pid(other.pid)
    assert kinds(probe, other.pid) == {"driver", "runtime"}
    assert metrics.total("infersight.cuda.libraries.attached") == 2


@pytest.mark.ebpf
def test_late_dlopen_is_found_by_rescan(stubs: StubBuild, apps: Callable[..., App],
                                        make_probe: Callable[..., CudaProbe]) -> None:
    pattern = Pattern(launches=6, syncs=2)
    probe = make_probe(rescan_s=0.1, poll_s=0.1)
    app = apps("runtime", pattern, stubs=stubs, lib=str(stubs.libcudart))
    probe.add_pid(app.pid)
    probe.start()
    assert probe.libraries(app.pid) == []  # nothing CUDA mapped yet

    app.signal("load")
    app.wait_file("loaded")
    wait_until(lambda: kinds(probe, app.pid) == {"driver", "runtime"}, "the rescan to attach the late libraries")
    app.run_pattern()
    done = time.monotonic_ns()

    # The background thread polls; wait until it has read the run's last bucket.
    last = done + BUCKET_NS + probe.config.settle_ns
    wait_until(lambda: time.monotonic_ns() > last + 300_000_000, "the thread's poll after the last bucket")
    history = probe.history(app.pid)
    assert totals(history, app.pid) == pattern.expected("runtime")
    assert_sync_hist(history, app.pid, pattern.syncs)
    # The exited process is dropped from the targets by the rescan; its history stays.
    wait_until(lambda: app.pid not in probe.pids(), "the exited pid to leave the targets")
    assert probe.history(app.pid) == history


@pytest.mark.ebpf
def test_library_inside_another_mount_namespace(stubs: StubBuild, apps: Callable[..., App],
                                                make_probe: Callable[..., CudaProbe], tmp_path: Path) -> None:
    """The libraries exist only in the program's mount namespace (a bind mount
    the agent's namespace lacks), as in a container: /proc/<pid>/root reaches them."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) not installed")
    hidden = tmp_path / "container-lib"
    hidden.mkdir()
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount --bind {stubs.dir} {hidden} && exec "$0" "$@"', str(stubs.app)]
    pattern = Pattern(launches=4, allocs=2, syncs=2)
    probe = make_probe()
    app = apps("driver", pattern, stubs=stubs, prefix=prefix, libdir=hidden)
    assert not (hidden / "libcuda.so.1").exists()  # not in the agent's view
    probe.add_pid(app.pid)
    libs = {lib.kind: lib for lib in probe.libraries(app.pid)}
    assert libs["driver"].path == f"{hidden}/libcuda.so.1"

    app.run_pattern()
    buckets = read_all(probe, time.monotonic_ns())
    assert totals(buckets, app.pid) == pattern.expected("driver")


@pytest.mark.ebpf
def test_window_and_points(stubs: StubBuild, apps: Callable[..., App],
                           make_probe: Callable[..., CudaProbe]) -> None:
    pattern = Pattern()
    probe = make_probe()
    app = apps("runtime", pattern, stubs=stubs)
    probe.add_pid(app.pid)
    t0 = time.time_ns()
    app.run_pattern()
    t1 = time.time_ns()
    read_all(probe, time.monotonic_ns())

    w = probe.window(app.pid, t0, t1)
    assert w is not None
    assert {k: getattr(w, k) for k in pattern.expected("runtime")} == pattern.expected("runtime")
    # The buckets summed overlap [t0, t1] (1 ms of slack for the clock offset read at each conversion).
    slack = 1_000_000
    assert t0 - BUCKET_NS - slack <= w.start_unix_nano <= t1 + slack
    assert t0 - slack <= w.end_unix_nano <= t1 + BUCKET_NS + slack
    assert w.buckets == len(probe.history(app.pid))
    assert probe.window(app.pid, t0 - 10 * BUCKET_NS, t0 - 5 * BUCKET_NS) is None
    assert probe.window(app.pid + 1, t0, t1) is None

    points = {(p.name, tuple(sorted(p.attributes.items()))): p for p in probe.points()}
    pid = (("process.pid", app.pid),)
    exp = pattern.expected("runtime")
    direction = "gpu.cuda.memcpy.direction"
    assert {key: p.value for key, p in points.items()} == {
        ("gpu.cuda.kernel.launch.calls", pid): exp["launches"],
        ("gpu.cuda.graph.launch.calls", pid): exp["graph_launches"],
        ("gpu.cuda.memory.allocated", pid): exp["alloc_bytes"],
        ("gpu.cuda.memory.freed", pid): exp["free_bytes"],
        ("gpu.cuda.memcpy.bytes", ((direction, "device_to_device"), *pid)): exp["memcpy_dtod_bytes"],
        ("gpu.cuda.memcpy.bytes", ((direction, "device_to_host"), *pid)): exp["memcpy_dtoh_bytes"],
        ("gpu.cuda.memcpy.bytes", ((direction, "host_to_device"), *pid)): exp["memcpy_htod_bytes"],
        ("gpu.cuda.memcpy.bytes", ((direction, "other"), *pid)): exp["memcpy_other_bytes"],
        ("gpu.cuda.sync.calls", pid): exp["sync_calls"],
        ("gpu.cuda.sync.duration", pid): pytest.approx(w.sync_ns / 1e9),
    }
    assert all(p.kind == "counter" and p.prom_name.endswith("_total") for p in points.values())
    assert points[("gpu.cuda.memory.allocated", pid)].unit == "By"
    assert points[("gpu.cuda.sync.duration", pid)].unit == "s"
    assert points[("gpu.cuda.sync.duration", pid)].value >= pattern.syncs * SYNC_US / 1e6

    # The agent's real metric state takes probe.points as a collector source.
    m = SelfMetrics()
    state = MetricState(AttributeBounds(metrics=m), metrics=m)
    state.add_point_source(probe.points)
    exported = {
        (snap.instrument.prom_name, pt.labels): pt.value
        for snap in state.collect()
        if snap.instrument.prom_name.startswith("gpu_cuda_")
        for pt in snap.points
        if isinstance(pt, ScalarPoint)
    }
    assert exported[("gpu_cuda_kernel_launch_calls_total", ())] == exp["launches"]
    assert exported[("gpu_cuda_memcpy_bytes_total", ("host_to_device",))] == exp["memcpy_htod_bytes"]
    assert m.total(SOURCE_ERRORS) == 0


@pytest.mark.ebpf
def test_window_reads_the_buckets_not_polled_yet(stubs: StubBuild, apps: Callable[..., App],
                                                 make_probe: Callable[..., CudaProbe],
                                                 metrics: SelfMetrics) -> None:
    """A window that ends now carries the calls made up to now: a request answered within one
    bucket (as a real server's mostly are) must not wait for its bucket to be polled. The
    probe's thread is not started, so nothing is polled unless the test says so."""
    bucket = 4_000_000_000
    pattern = Pattern()
    # at most 1 + 1 buckets read in place: live_buckets, and the thread's lag (1.1 s) in buckets
    probe = make_probe(bucket_ns=bucket, live_buckets=1, poll_s=1.0, settle_ns=100_000_000)
    app = apps("runtime", pattern, stubs=stubs)
    probe.add_pid(app.pid)
    # the pattern (well under a second) runs inside one bucket
    wait_until(lambda: time.monotonic_ns() % bucket < bucket // 4, "the start of a bucket", timeout=6)
    t0 = time.time_ns()
    app.run_pattern()
    t1 = time.time_ns()

    assert probe.history(app.pid) == []
    assert window_counts(probe.window(app.pid, t0, t1)) == pattern.expected("runtime")
    assert metrics.get("infersight.cuda.window.truncated") == 0
    # read in place, not taken: asked again, the same counts
    assert window_counts(probe.window(app.pid, t0, t1)) == pattern.expected("runtime")
    assert probe.window(app.pid + 1, t0, t1) is None

    # a window over more unread buckets than that reads the newest (which hold the calls)
    assert window_counts(probe.window(app.pid, t0 - 3 * bucket, t1)) == pattern.expected("runtime")
    assert metrics.get("infersight.cuda.window.truncated") == 1

    # once polled, from the history, and not counted twice with the kernel
    assert len(probe.poll(flush=True)) == 1
    assert len(probe.history(app.pid)) == 1
    assert window_counts(probe.window(app.pid, t0, t1)) == pattern.expected("runtime")


@pytest.mark.ebpf
def test_bucket_map_evictions_are_counted(stubs: StubBuild, apps: Callable[..., App],
                                          make_probe: Callable[..., CudaProbe], metrics: SelfMetrics) -> None:
    """With a 4-entry bucket map and 5 ms buckets, 10 synchronize calls 20 ms
    apart land in 10 different buckets, and nobody reads them in time."""
    pattern = Pattern(launches=0, graphs=0, allocs=1, syncs=10)
    probe = make_probe(bucket_ns=5_000_000, max_buckets=4)
    app = apps("driver", pattern, stubs=stubs)
    probe.add_pid(app.pid)
    app.run_pattern()
    buckets = probe.poll(flush=True)
    evicted = metrics.get("infersight.cuda.map.evictions", (("map", "buckets"),))
    assert len(buckets) <= 4
    assert evicted >= 1
    assert len(buckets) + evicted >= pattern.syncs
    assert sum(b.sync_calls for b in buckets) < pattern.syncs  # the data lost is really lost


@pytest.mark.ebpf
def test_allocation_map_evictions_are_counted(stubs: StubBuild, apps: Callable[..., App],
                                              make_probe: Callable[..., CudaProbe], metrics: SelfMetrics) -> None:
    """An 8-entry allocation map and 20 allocations: the frees of evicted
    allocations count no bytes but show as untracked, and the audit counts the
    evictions, so that evictions + frees with bytes + entries left = allocations."""
    pattern = Pattern(launches=0, graphs=0, allocs=20, alloc_size=4096, syncs=0)
    probe = make_probe(max_allocs=8)
    app = apps("driver", pattern, stubs=stubs)
    probe.add_pid(app.pid)
    app.run_pattern()
    buckets = probe.poll(flush=True)  # a flush audits the allocation map
    freed = sum(b.free_bytes for b in buckets if b.pid == app.pid) // pattern.alloc_size
    untracked = metrics.get("infersight.cuda.frees.untracked")
    evicted = metrics.get("infersight.cuda.map.evictions", (("map", "allocations"),))
    left = sum(1 for k in probe._allocs.keys() if k.tgid == app.pid)
    assert sum(b.alloc_bytes for b in buckets) == 20 * 4096
    assert evicted >= 12
    assert freed + (untracked - 1) == 19  # 19 frees of real allocations, 1 of a never-allocated pointer
    assert evicted + freed + left == 20


def _fake_proc_pid(proc: Path, pid: int, start_time: int, maps: str) -> None:
    """One process in a recorded-style /proc tree: stat (start time is field 22), maps, root."""
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    rest = ["S", "1"] + ["0"] * 17 + [str(start_time)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (python3 (worker)) {' '.join(rest)}\n")
    (d / "maps").write_text(maps)
    if not (d / "root").exists():
        (d / "root").symlink_to("/")


@pytest.mark.ebpf
def test_rescan_drops_exited_and_reused_pids(stubs: StubBuild, make_probe: Callable[..., CudaProbe],
                                            metrics: SelfMetrics, tmp_path: Path) -> None:
    st = stubs.libcuda.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    maps = f"7f0000000000-7f0000001000 r-xp 00000000 {dev} {st.st_ino} {stubs.libcuda}\n"
    proc = tmp_path / "proc"
    _fake_proc_pid(proc, 4242, 1000, maps)
    _fake_proc_pid(proc, 4343, 2000, "")
    probe = make_probe(proc=str(proc))
    probe.add_pid(4242)
    probe.add_pid(4343)
    probe.add_pid(4444)  # no such process: ignored
    assert probe.pids() == [4242, 4343]
    assert [(lib.kind, lib.inode) for lib in probe.libraries(4242)] == [("driver", st.st_ino)]
    assert sorted(k.value for k in probe._targets.keys()) == [4242, 4343]

    _fake_proc_pid(proc, 4242, 1001, maps)  # pid reused by a newer process
    shutil.rmtree(proc / "4343")  # exited
    probe.rescan()
    assert probe.pids() == []
    assert list(probe._targets.keys()) == []
    assert metrics.total("infersight.cuda.libraries.attached") == 1


@pytest.mark.ebpf
def test_unattachable_library_is_counted_and_retried_a_bounded_number_of_times(
        make_probe: Callable[..., CudaProbe], metrics: SelfMetrics, tmp_path: Path) -> None:
    bogus = tmp_path / "lib" / "libcuda.so.1"
    bogus.parent.mkdir()
    bogus.write_bytes(b"not an ELF file")
    st = bogus.stat()
    proc = tmp_path / "proc"
    _fake_proc_pid(proc, 4242, 1000,
                   f"7f0000000000-7f0000001000 r-xp 00000000 {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} "
                   f"{st.st_ino} {bogus}\n")
    probe = make_probe(proc=str(proc), max_attach_attempts=2)  # a recorded /proc tree; the BPF side is real
    probe.add_pid(4242)
    for _ in range(3):
        probe.rescan()
    assert probe.libraries() == []
    assert probe.pids() == [4242]  # the process stays a target; only its library is given up on
    assert metrics.get("infersight.cuda.attach.failures", (("library", "driver"),)) == 2
    assert metrics.total("infersight.cuda.symbols.missing") == 0
