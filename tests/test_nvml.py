"""NVML collector against a fake libnvidia-ml.so.1 loaded by the real pynvml.

The fake (tests/fake_nvml/fake_nvml.c) is compiled once per session against
the official nvml.h and opened in-process through ``library_path``. Each test
writes its own scenario file; the fake re-reads it when it changes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from agent.selfmetrics import SelfMetrics
from collectors.nvml import (
    COLLECTOR_UP,
    GPU_UP,
    PROCESSES_DROPPED,
    RETRIES,
    UNSUPPORTED,
    GpuDevice,
    MetricPoint,
    NvmlCollector,
    NvmlConfig,
    backoff_delay,
    load_metric_set,
    prometheus_name,
)
from tests.fake_nvml import SCENARIO_ENV, FakeNvmlUnavailable, Scenario, build
from tests.join_support import GPU0, GPU1, MIG_A, MIG_B, S

NVML_UP = (("source", "nvml"),)

BASE: dict[str, object] = {
    "driver": 1,
    "gpus": 2,
    "gpu0.uuid": GPU0,
    "gpu0.name": "NVIDIA H100 80GB HBM3",
    "gpu0.pci": "00000000:17:00.0",
    "gpu0.mem_total": 85_899_345_920,
    "gpu0.mem_used": 21_474_836_480,
    "gpu0.util_gpu": 37,
    "gpu0.util_mem": 12,
    "gpu0.power_mw": 250_500,
    "gpu0.energy_mj": 123_456_789,
    "gpu0.temp_c": 55,
    "gpu0.clock_sm_mhz": 1980,
    "gpu0.clock_mem_mhz": 2619,
    # no pcie_* keys: PCIe throughput is NOT_SUPPORTED on gpu0
    "gpu1.uuid": GPU1,
    "gpu1.name": "NVIDIA A100-SXM4-40GB",
    "gpu1.pci": "00000000:65:00.0",
    "gpu1.mem_total": 42_949_672_960,
    "gpu1.mem_used": 1_073_741_824,
    "gpu1.util_gpu": 0,
    "gpu1.util_mem": 0,
    "gpu1.pcie_tx_kbs": 1000,
    "gpu1.pcie_rx_kbs": 2000,
    "gpu1.mig": 1,
    "gpu1.migs": 2,
    "gpu1.mig0.uuid": MIG_A,
    "gpu1.mig0.name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
    "gpu1.mig0.gi": 1,
    "gpu1.mig0.ci": 0,
    "gpu1.mig0.mem_total": 20_000_000_000,
    "gpu1.mig0.mem_used": 5_000_000_000,
    "gpu1.mig1.uuid": MIG_B,
    "gpu1.mig1.name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
    "gpu1.mig1.gi": 2,
    "gpu1.mig1.ci": 0,
    "gpu1.mig1.mem_total": 20_000_000_000,
    "gpu1.mig1.mem_used": 1_000_000_000,
}


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    try:
        return str(build(tmp_path_factory.mktemp("fake_nvml")))
    except FakeNvmlUnavailable as e:
        pytest.skip(f"fake NVML cannot be built: {e}")


@pytest.fixture
def scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scenario:
    sc = Scenario(tmp_path / "scenario.txt")
    sc.set(BASE)
    monkeypatch.setenv(SCENARIO_ENV, str(sc.path))
    return sc


class ManualClock:
    def __init__(self, t: int = 1_700_000_000 * S) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def make(fake_lib: str) -> Iterator[Callable[..., tuple[NvmlCollector, SelfMetrics]]]:
    made: list[NvmlCollector] = []

    def _make(clock: Callable[[], int] = time.time_ns, **cfg: object) -> tuple[NvmlCollector, SelfMetrics]:
        settings: dict[str, object] = {"event_timeout_ms": 50, "retry_initial_s": 0.02, "retry_max_s": 0.2}
        settings.update(cfg)
        m = SelfMetrics()
        c = NvmlCollector(NvmlConfig(**settings), metrics=m, clock=clock, library_path=fake_lib)  # type: ignore[arg-type]
        made.append(c)
        return c, m

    yield _make
    for c in made:
        c.stop()


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def by_name(points: list[MetricPoint], name: str, **attrs: str) -> list[MetricPoint]:
    return [p for p in points if p.name == name and all(p.attributes.get(k.replace("_", ".")) == v
                                                        for k, v in attrs.items())]


def one(points: list[MetricPoint], name: str, uuid: str, **attrs: str) -> MetricPoint:
    found = [p for p in points if p.name == name and p.attributes["gpu.uuid"] == uuid
             and all(p.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, uuid, found)
    return found[0]


def warnings(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "collectors.nvml" and r.levelno >= level]


# --------------------------------------------------------------------------- metric set


def test_prometheus_names_use_base_units_and_total_on_counters() -> None:
    assert prometheus_name("hw.gpu.utilization", "1", "gauge") == "hw_gpu_utilization_ratio"
    assert prometheus_name("hw.gpu.memory.usage", "By", "gauge") == "hw_gpu_memory_usage_bytes"
    assert prometheus_name("hw.power", "W", "gauge") == "hw_power_watts"
    assert prometheus_name("hw.energy", "J", "counter") == "hw_energy_joules_total"
    assert prometheus_name("hw.temperature", "Cel", "gauge") == "hw_temperature_celsius"
    assert prometheus_name("hw.gpu.clock.speed", "Hz", "gauge") == "hw_gpu_clock_speed_hertz"
    assert prometheus_name("hw.errors", "{error}", "counter") == "hw_errors_total"
    assert prometheus_name("x.duration_seconds", "s", "gauge") == "x_duration_seconds"
    assert prometheus_name("hw.gpu.pcie.throughput", "By/s", "gauge") == "hw_gpu_pcie_throughput_bytes_per_second"


def test_metric_set_uses_the_otel_hardware_names_and_valid_prometheus_names() -> None:
    from opentelemetry.semconv._incubating.metrics import hw_metrics

    specs = load_metric_set()
    names = {s.field: s.name for s in specs}
    assert names["utilization.gpu"] == hw_metrics.HW_GPU_UTILIZATION
    assert names["memory.used"] == hw_metrics.HW_GPU_MEMORY_USAGE
    assert names["memory.total"] == hw_metrics.HW_GPU_MEMORY_LIMIT
    assert names["memory.utilization"] == hw_metrics.HW_GPU_MEMORY_UTILIZATION
    assert names["power.draw"] == hw_metrics.HW_POWER
    assert names["energy.total"] == hw_metrics.HW_ENERGY
    assert names["temperature.gpu"] == hw_metrics.HW_TEMPERATURE
    assert names["xid"] == hw_metrics.HW_ERRORS
    for s in specs:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s.prom_name), s
        assert s.help and s.unit
        assert s.name.startswith("hw."), s
    # one Prometheus series family per name: rows sharing a name differ in attributes
    seen = {(s.source, s.name, s.attributes) for s in specs}
    assert len(seen) == len(specs)


def test_malformed_metric_set_raises(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("source,field,name,kind,unit,scale,scope,attributes,help\nnvml,x,hw.x,histogram,1,1,device,,h\n")
    with pytest.raises(ValueError):
        load_metric_set(bad)
    bad.write_text("source,field,name,kind,unit,scale,scope,attributes,help\nnvml,x,hw.x\n")
    with pytest.raises(ValueError):
        load_metric_set(bad)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize("bad", [{"period_s": 0}, {"max_processes": 0}, {"retry_initial_s": 5, "retry_max_s": 1},
                                 {"event_timeout_ms": 0}])
def test_config_is_validated_once(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NvmlConfig(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- discovery and values


def test_discovers_gpus_and_mig_devices(make, scenario: Scenario) -> None:
    c, m = make(period_s=3600)
    c.start()
    assert m.get(COLLECTOR_UP, NVML_UP) == 1
    assert c.devices() == [
        GpuDevice(GPU0, 0, "NVIDIA H100 80GB HBM3", "00000000:17:00.0", False),
        GpuDevice(GPU1, 1, "NVIDIA A100-SXM4-40GB", "00000000:65:00.0", True),
        GpuDevice(MIG_A, 1, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "00000000:65:00.0", False, GPU1, 1, 0),
        GpuDevice(MIG_B, 1, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "00000000:65:00.0", False, GPU1, 2, 0),
    ]
    for uuid in (GPU0, GPU1, MIG_A, MIG_B):
        assert m.get(GPU_UP, (("gpu.uuid", uuid),)) == 1


def test_points_carry_otel_names_base_units_and_gpu_attributes(make, scenario: Scenario) -> None:
    c, m = make(period_s=3600)
    c.start()
    c.sample_now()
    pts = c.points()
    util = one(pts, "hw.gpu.utilization", GPU0)
    assert util.value == pytest.approx(0.37)
    assert util.prom_name == "hw_gpu_utilization_ratio"
    assert (util.kind, util.unit) == ("gauge", "1")
    assert util.attributes == {
        "gpu.uuid": GPU0, "hw.id": GPU0, "gpu.index": "0", "gpu.name": "NVIDIA H100 80GB HBM3",
        "gpu.pci_bus_id": "00000000:17:00.0", "hw.gpu.task": "general",
    }
    assert one(pts, "hw.gpu.memory_controller.utilization", GPU0).value == pytest.approx(0.12)
    assert one(pts, "hw.gpu.memory.usage", GPU0).value == 21_474_836_480
    assert one(pts, "hw.gpu.memory.limit", GPU0).value == 85_899_345_920
    assert one(pts, "hw.gpu.memory.utilization", GPU0).value == pytest.approx(0.25)
    power = one(pts, "hw.power", GPU0, **{"hw.type": "gpu"})
    assert (power.value, power.prom_name) == (pytest.approx(250.5), "hw_power_watts")
    energy = one(pts, "hw.energy", GPU0)
    assert (energy.value, energy.kind, energy.prom_name) == (pytest.approx(123_456.789), "counter",
                                                              "hw_energy_joules_total")
    assert one(pts, "hw.temperature", GPU0).prom_name == "hw_temperature_celsius"
    assert one(pts, "hw.gpu.clock.speed", GPU0, **{"hw.gpu.clock.domain": "sm"}).value == 1.98e9
    assert one(pts, "hw.gpu.clock.speed", GPU0, **{"hw.gpu.clock.domain": "memory"}).value == 2.619e9
    # PCIe throughput: absent on gpu0 (NOT_SUPPORTED), present on gpu1
    assert not [p for p in pts if p.name == "hw.gpu.pcie.throughput" and p.attributes["gpu.uuid"] == GPU0]
    tx = one(pts, "hw.gpu.pcie.throughput", GPU1, **{"network.io.direction": "transmit"})
    assert (tx.value, tx.prom_name) == (1000 * 1024, "hw_gpu_pcie_throughput_bytes_per_second")
    # MIG devices: memory only (NVML answers NOT_SUPPORTED for the rest), with MIG attributes
    mig = one(pts, "hw.gpu.memory.usage", MIG_B)
    assert mig.value == 1_000_000_000
    assert mig.attributes["gpu.mig.gi_id"] == "2"
    assert mig.attributes["gpu.mig.ci_id"] == "0"
    assert mig.attributes["gpu.mig.parent_uuid"] == GPU1 == mig.attributes["hw.parent"]
    assert not [p for p in pts if p.name == "hw.gpu.utilization" and p.attributes["gpu.uuid"] == MIG_B]
    # unsupported calls are counted once per device, however often we sample
    c.sample_now()
    c.sample_now()
    assert m.get(UNSUPPORTED, (("field", "pcie.tx"),)) == 3  # gpu0 + the two MIG devices
    assert m.get(UNSUPPORTED, (("field", "utilization"),)) == 2  # the two MIG devices
    # no point ever carries a pid
    assert all("process.pid" not in p.attributes for p in pts)


def test_device_window_mean_and_max_over_several_samples(make, scenario: Scenario) -> None:
    clock = ManualClock()
    c, _ = make(clock=clock, period_s=3600)
    c.start()  # first sample at t0 with util 37%
    t0 = clock.t
    for i, util in enumerate([10, 50, 90], start=1):
        scenario.update({"gpu0.util_gpu": util})
        clock.t = t0 + i * S
        c.sample_now()
    w = c.device_window(GPU0, t0 + 1 * S, t0 + 3 * S)
    assert w is not None
    assert w.samples == 3
    assert w.mean["utilization.gpu"] == pytest.approx(0.5)
    assert w.max["utilization.gpu"] == pytest.approx(0.9)
    assert w.mean["power.draw"] == pytest.approx(250.5)
    # a 100 ms window between two samples answers with the sample before it
    w = c.device_window(GPU0, t0 + 1 * S + 100_000_000, t0 + 1 * S + 200_000_000)
    assert w is not None and w.samples == 1 and w.mean["utilization.gpu"] == pytest.approx(0.1)
    assert c.device_window("GPU-unknown", t0, t0 + 3 * S) is None
    mig = c.device_window(MIG_A, t0, t0 + 3 * S)
    assert mig is not None and mig.max["memory.used"] == 5_000_000_000


def test_quick_samples_keep_utilisation_and_power_fresh_between_full_samples(make, scenario: Scenario) -> None:
    """Utilisation and power are read every fast_period_s, the rest every period_s: a short
    window finds the latest quick reading of the first, and the last full sample of the rest."""
    c, _ = make(period_s=3600, fast_period_s=0.05)
    t_start = time.time_ns()
    c.start()  # the one full sample: util 37%, 250.5 W, 55 °C
    scenario.update({"gpu0.util_gpu": 90, "gpu0.power_mw": 400_000, "gpu0.temp_c": 70})

    def short_window() -> object:
        now = time.time_ns()
        return c.device_window(GPU0, now - 10_000_000, now)

    wait_for(lambda: (w := short_window()) is not None and w.mean.get("utilization.gpu") == pytest.approx(0.9))
    w = short_window()
    assert w is not None
    assert w.mean["power.draw"] == pytest.approx(400.0)
    assert w.mean["temperature.gpu"] == 55.0  # not read since the full sample
    assert w.mean["memory.used"] == 21_474_836_480
    assert w.samples == 2  # the last quick sample, and the full one before it
    # over a longer window, every quick sample counts towards utilisation; temperature has one
    wait_for(lambda: (c.device_window(GPU0, t_start, time.time_ns(), ("utilization.gpu",)) or w).samples >= 4)
    whole = c.device_window(GPU0, t_start, time.time_ns(), ("temperature.gpu",))
    assert whole is not None and whole.mean == {"temperature.gpu": 55.0} and whole.max == whole.mean
    # the exported gauges take the quick readings too
    values = {p.name: p.value for p in c.points() if p.attributes["gpu.uuid"] == GPU0}
    assert values["hw.gpu.utilization"] == pytest.approx(0.9)
    assert values["hw.power"] == pytest.approx(400.0)
    assert values["hw.temperature"] == 55.0


def test_points_omit_values_older_than_three_periods(make, scenario: Scenario) -> None:
    clock = ManualClock()
    c, _ = make(clock=clock, period_s=1000)
    c.start()
    assert c.points()
    clock.t += 2999 * S
    assert c.points()
    clock.t += 2 * S  # 3001 s after the only sample, period 1000 s
    assert c.points() == []


# --------------------------------------------------------------------------- processes


def test_per_process_memory_and_utilisation(make, scenario: Scenario) -> None:
    t_us = 1_700_000_000_000_000
    scenario.update({
        "gpu0.procs": 2,
        "gpu0.proc0.pid": 4242, "gpu0.proc0.mem": 8_000_000_000, "gpu0.proc0.sm": 40, "gpu0.proc0.memutil": 20,
        "gpu0.proc0.ts_us": t_us,
        "gpu0.proc1.pid": 4343, "gpu0.proc1.mem": 1_000_000,  # running but idle: no utilisation sample
        "gpu1.procs": 1,
        "gpu1.proc0.pid": 777, "gpu1.proc0.mem": 2_000_000_000, "gpu1.proc0.gi": 2, "gpu1.proc0.ci": 0,
        "gpu1.proc_util": 0,  # NVML has no per-process utilisation in MIG mode
    })
    clock = ManualClock(t_us * 1000)
    c, m = make(clock=clock, period_s=3600)
    c.start()
    assert c.processes() == {4242: (GPU0,), 4343: (GPU0,), 777: (MIG_B,)}
    # a second NVML sample for 4242, one second later and busier
    scenario.update({"gpu0.proc0.sm": 80, "gpu0.proc0.memutil": 40, "gpu0.proc0.ts_us": t_us + 1_000_000})
    clock.t += S
    c.sample_now()
    w = c.process_window(4242, t_us * 1000, (t_us + 1_000_000) * 1000)
    assert w is not None
    assert w.mean["process.sm"] == pytest.approx(0.6)
    assert w.max["process.sm"] == pytest.approx(0.8)
    assert w.mean["process.memutil"] == pytest.approx(0.3)
    assert w.max["process.memory.used"] == 8_000_000_000
    # the cursor (lastSeenTimeStamp) means a sample is never taken twice
    c.sample_now()
    w = c.process_window(4242, 0, 2**62)
    assert w is not None and w.mean["process.sm"] == pytest.approx(0.6)
    mig = c.process_window(777, 0, 2**62)
    assert mig is not None and mig.mean == {"process.memory.used": 2_000_000_000}
    assert m.get(UNSUPPORTED, (("field", "process_utilization"),)) == 1
    pp = c.process_points()
    sm = [(pid, p) for pid, p in pp if p.name == "hw.gpu.process.utilization"]
    assert [(pid, p.attributes["gpu.uuid"]) for pid, p in sm] == [(4242, GPU0)]
    assert sm[0][1].value == pytest.approx(0.8)
    assert {pid for pid, p in pp if p.name == "hw.gpu.process.memory.usage"} == {4242, 4343, 777}
    # per-process values never reach points(): the exporters get no pid label
    assert not [p for p in c.points() if p.name.startswith("hw.gpu.process.")]
    # the table is the scan's own, not copied per call (the join reads it per record)...
    before = c.processes()
    assert c.processes() is before
    # ...and a process that exits leaves processes() on the next scan, which makes a new
    # table: one already handed out stays as it was
    scenario.update({"gpu0.procs": 1})
    c.sample_now()
    assert c.processes() == {4242: (GPU0,), 777: (MIG_B,)}
    assert before == {4242: (GPU0,), 4343: (GPU0,), 777: (MIG_B,)}


def test_short_window_falls_back_to_memory_and_utilisation_each(make, scenario: Scenario) -> None:
    """A window between two samples falls back to the last memory sample and the last
    utilisation sample alike, though NVML stamped the utilisation after our memory read."""
    t_us = 1_700_000_000_000_000
    clock = ManualClock(t_us * 1000)
    scenario.update({"gpu0.procs": 1, "gpu0.proc0.pid": 4242, "gpu0.proc0.mem": 8_000_000_000,
                     "gpu0.proc0.sm": 40, "gpu0.proc0.memutil": 20, "gpu0.proc0.ts_us": t_us + 300_000})
    c, _ = make(clock=clock, period_s=3600)
    c.start()  # one sample: memory at t_us, utilisation stamped 0.3 s later
    t0 = (t_us + 500_000) * 1000
    w = c.process_window(4242, t0, t0 + 60_000_000)  # 60 ms, no sample inside
    assert w is not None
    assert w.max["process.memory.used"] == 8_000_000_000
    assert w.mean["process.sm"] == pytest.approx(0.4)
    assert w.samples == 2


def test_process_bound_drops_and_counts(make, scenario: Scenario) -> None:
    scenario.update({"gpu0.procs": 3, "gpu0.proc0.pid": 1, "gpu0.proc0.mem": 1, "gpu0.proc1.pid": 2,
                     "gpu0.proc1.mem": 1, "gpu0.proc2.pid": 3, "gpu0.proc2.mem": 1})
    c, m = make(period_s=3600, max_processes=2)
    c.start()
    assert c.processes() == {1: (GPU0,), 2: (GPU0,)}
    assert m.get(PROCESSES_DROPPED) == 1


# --------------------------------------------------------------------------- events


def test_xid_events_are_counted_per_gpu_and_code(make, scenario: Scenario) -> None:
    c, _ = make(period_s=3600)
    c.start()
    scenario.update({"xids": 3, "xid0": "0:13", "xid1": "0:13", "xid2": "1:48"})
    wait_for(lambda: sum(c.xid_counts().values()) == 3)
    assert c.xid_counts() == {(GPU0, "13"): 2, (GPU1, "48"): 1}
    errors = [p for p in c.points() if p.name == "hw.errors"]
    assert {(p.attributes["gpu.uuid"], p.attributes["gpu.xid.code"], p.value) for p in errors} == {
        (GPU0, "13", 2.0), (GPU1, "48", 1.0)}
    assert errors[0].prom_name == "hw_errors_total"
    assert errors[0].attributes["error.type"] == "xid"


def test_xid_codes_beyond_the_cap_count_as_other(make, scenario: Scenario) -> None:
    c, _ = make(period_s=3600, max_xid_codes=2)
    c.start()
    scenario.update({"xids": 4, "xid0": "0:13", "xid1": "0:31", "xid2": "0:43", "xid3": "0:13"})
    wait_for(lambda: sum(c.xid_counts().values()) == 4)
    assert c.xid_counts() == {(GPU0, "13"): 2, (GPU0, "31"): 1, (GPU0, "other"): 1}


# --------------------------------------------------------------------------- degradation


def test_missing_library_degrades_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.nvml")
    m = SelfMetrics()
    c = NvmlCollector(NvmlConfig(retry_initial_s=0.02, retry_max_s=0.05, event_timeout_ms=50), metrics=m,
                      library_path=str(tmp_path / "libnvidia-ml.so.1"))
    c.start()
    try:
        wait_for(lambda: m.get(RETRIES, NVML_UP) >= 3)
        assert m.get(COLLECTOR_UP, NVML_UP) == 0
        assert c.devices() == [] and c.points() == [] and c.processes() == {}
        c.sample_now()  # a no-op, never an exception
        assert len(warnings(caplog, logging.INFO)) == 1
    finally:
        c.stop()


def test_driver_not_loaded_at_init_then_recovers(make, scenario: Scenario,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.nvml")
    scenario.update({"driver": 0})
    c, m = make(period_s=0.05)
    c.start()
    assert m.get(COLLECTOR_UP, NVML_UP) == 0
    wait_for(lambda: m.get(RETRIES, NVML_UP) >= 3)
    assert c.points() == [] and c.devices() == []
    msgs = warnings(caplog)
    assert len(msgs) == 1 and "Driver Not Loaded" in msgs[0]
    scenario.update({"driver": 1})
    wait_for(lambda: m.get(COLLECTOR_UP, NVML_UP) == 1)
    wait_for(lambda: bool(c.points()))
    assert len(c.devices()) == 4
    assert len(warnings(caplog)) == 1


def test_driver_unloaded_mid_run_turns_collection_off_and_back(make, scenario: Scenario,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.nvml")
    c, m = make(period_s=0.05)
    c.start()
    assert c.points()
    scenario.update({"driver": 0})
    wait_for(lambda: m.get(COLLECTOR_UP, NVML_UP) == 0)
    assert c.points() == []  # nothing stale is exported as fresh
    retries = m.get(RETRIES, NVML_UP)
    wait_for(lambda: m.get(RETRIES, NVML_UP) >= retries + 2)
    assert len(warnings(caplog)) == 1
    scenario.update({"driver": 1})
    wait_for(lambda: m.get(COLLECTOR_UP, NVML_UP) == 1)
    wait_for(lambda: bool(by_name(c.points(), "hw.gpu.utilization")))
    # the event thread re-registered with the new NVML session
    scenario.update({"xids": 1, "xid0": "1:48"})
    wait_for(lambda: c.xid_counts() == {(GPU1, "48"): 1})
    # every nvmlInit was matched by an nvmlShutdown, re-init included
    c.stop()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_lost_gpu_turns_off_that_gpu_only_then_recovers(make, scenario: Scenario,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.nvml")
    c, m = make(period_s=0.05)
    c.start()
    scenario.update({"gpu1.lost": 1})
    wait_for(lambda: m.get(GPU_UP, (("gpu.uuid", GPU1),)) == 0)
    assert m.get(GPU_UP, (("gpu.uuid", MIG_A),)) == 0
    assert m.get(GPU_UP, (("gpu.uuid", GPU0),)) == 1
    assert m.get(COLLECTOR_UP, NVML_UP) == 1
    pts = c.points()
    assert {p.attributes["gpu.uuid"] for p in pts} == {GPU0}
    gpu_retries = m.get(RETRIES, (("source", "nvml.gpu"),))
    wait_for(lambda: m.get(RETRIES, (("source", "nvml.gpu"),)) >= gpu_retries + 2)
    msgs = warnings(caplog)
    assert len(msgs) == 1 and GPU1 in msgs[0] and "GPU is lost" in msgs[0]
    scenario.update({"gpu1.lost": 0})
    wait_for(lambda: m.get(GPU_UP, (("gpu.uuid", GPU1),)) == 1)
    wait_for(lambda: {p.attributes["gpu.uuid"] for p in c.points()} == {GPU0, GPU1, MIG_A, MIG_B})
    assert len(warnings(caplog)) == 1


def test_xid_79_marks_the_gpu_lost(make, scenario: Scenario, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.nvml")
    c, m = make(period_s=3600, retry_initial_s=3600, retry_max_s=3600)
    c.start()
    scenario.update({"xids": 1, "xid0": "0:79"})
    wait_for(lambda: m.get(GPU_UP, (("gpu.uuid", GPU0),)) == 0)
    assert c.xid_counts() == {(GPU0, "79"): 1}
    pts = c.points()
    assert not [p for p in pts if p.attributes["gpu.uuid"] == GPU0 and p.name != "hw.errors"]
    assert [p.value for p in pts if p.name == "hw.errors"] == [1.0]
    assert by_name(pts, "hw.gpu.memory.usage")  # the other GPU goes on
    msgs = warnings(caplog)
    assert len(msgs) == 1 and "XID 79" in msgs[0]
