"""What the GPU join costs per record, by how the pod's processes sit on its GPUs, GPUs and
request length.

    python -m bench.join_cost [--history-seconds S] [--records N] [--gpus LIST] [--windows LIST] [--json]

The overhead benchmarks run on machines without a GPU, where the join finds no GPU
process and adds nothing; on a GPU node it summarises, for every record, what the
pod's GPUs and processes did over the request's own window (``docs/join.md``). This
runs that path alone: the real NVML collector on the fake ``libnvidia-ml.so.1`` (built
from NVIDIA's ``nvml.h``, as the tests build it; needs gcc and PyPI
``nvidia-nvml-dev``), sampled once per simulated second over ``--history-seconds`` of
history, each GPU also running ``--others`` processes of other pods, and the join as
``infersight run`` builds it (no Kubernetes, no kubelet, no CUDA or DCGM sources). Two
layouts: ``shared``, the benchmark's own process on every GPU, serving the records;
``per_gpu``, a server process on none and a worker process on each GPU, all in one
pod's container (tensor parallelism as vLLM, SGLang and TGI run it; the processes live
in a fake /proc, their pod found through their cgroup), the server serving the records.

Printed: CPU time per record (``time.process_time``, the best of ``--repeat`` loops of
``--records``) with NVML down (the no-GPU node's path, as the overhead benchmarks
take it), then for each layout, GPU count and request length (the window's samples per
GPU with it), and the attributes one record of each layout carried. A record that comes
out without all its GPUs in ``gpu.uuids`` stops the benchmark: it would time another path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench import parse_sweep, print_result
from tests.join_support import ManualClock, S

#: where the serving pod's processes run: ``shared``, one process on every GPU; ``per_gpu``, a
#: process serving HTTP on none and a worker on each GPU (tensor parallelism as vLLM, SGLang and
#: TGI run it), the pod's processes found through their cgroup
LAYOUTS: Final = ("shared", "per_gpu")
#: the ``per_gpu`` layout's pids, in a fake /proc: the server, then its workers
SERVER_PID: Final = 700_000


def scenario_values(gpus: int, others: int, pid: int | list[int], ts_us: int) -> dict[str, object]:
    """The fake NVML's state: ``gpus`` GPUs, on each the process ``pid`` (or on GPU i the
    process ``pid[i]``) and ``others`` more, all with a utilisation sample at ``ts_us``."""
    v: dict[str, object] = {"driver": 1, "gpus": gpus}
    for i in range(gpus):
        ours = pid[i] if isinstance(pid, list) else pid
        g = f"gpu{i}"
        v.update({f"{g}.uuid": f"GPU-bench-{i:04d}", f"{g}.name": "NVIDIA H100 80GB HBM3",
                  f"{g}.pci": f"00000000:{0x17 + i:02x}:00.0", f"{g}.mem_total": 80 << 30,
                  f"{g}.mem_used": 60 << 30, f"{g}.util_gpu": 80, f"{g}.util_mem": 40, f"{g}.power_mw": 550_000,
                  f"{g}.energy_mj": 10_000_000, f"{g}.temp_c": 60, f"{g}.clock_sm_mhz": 1980,
                  f"{g}.clock_mem_mhz": 2619, f"{g}.procs": others + 1})
        for k, p in enumerate([ours, *range(900_000 + 10 * i, 900_000 + 10 * i + others)]):
            v.update({f"{g}.proc{k}.pid": p, f"{g}.proc{k}.mem": 8 << 30, f"{g}.proc{k}.sm": 70,
                      f"{g}.proc{k}.memutil": 30, f"{g}.proc{k}.ts_us": ts_us})
    return v


def per_record_us(join: Any, records: list[Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for r in records:
            join(r)
        best = min(best, time.process_time() - t0)
    return best / len(records) * 1e6


def bench(history_s: int, n: int, gpu_counts: tuple[int, ...], windows: tuple[float, ...], others: int,
          repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="infersight-join-cost-") as d:
        return _bench(Path(d), history_s, n, gpu_counts, windows, others, repeat)


def _bench(tmp: Path, history_s: int, n: int, gpu_counts: tuple[int, ...], windows: tuple[float, ...],
           others: int, repeat: int) -> dict[str, Any]:
    from agent.join import A_SAMPLES, A_UUIDS, Join, JoinConfig
    from agent.record import Request
    from agent.selfmetrics import SelfMetrics
    from collectors.nvml import NvmlCollector, NvmlConfig
    from tests.fake_nvml import SCENARIO_ENV, Scenario, build
    from tests.join_support import systemd_path, write_proc

    lib = build(tmp)
    scenario = Scenario(tmp / "scenario")
    os.environ[SCENARIO_ENV] = str(scenario.path)
    clock = ManualClock(time.time_ns() - 3600 * S)  # simulated wall-clock time
    proc = tmp / "proc"  # the per_gpu layout's processes, all in one pod's container
    pod = systemd_path("0b1c2d3e-0000-4000-8000-000000000001", "c0ffee" * 10 + "abcd")
    for p in range(SERVER_PID, SERVER_PID + 1 + max(gpu_counts)):
        write_proc(proc, p, pod)
    nvml_config = NvmlConfig(period_s=3600, fast_period_s=3600, event_timeout_ms=50, history_seconds=history_s + 60, events=False)

    def config(layout: str) -> JoinConfig:
        return JoinConfig(node_name="bench", k8s_enabled=False, kubelet_enabled=False, cuda_enabled=False,
                          dcgm_enabled=False, proc=str(proc) if layout == "per_gpu" else "/proc")

    def records(pid: int, window_s: float) -> list[Request]:
        t1 = clock.ns()
        t0 = t1 - int(window_s * S)
        return [Request(start_time_unix_nano=t0 + i, end_time_unix_nano=t1, pid=pid, command="python3",
                        method="POST", path="/v1/chat/completions", status_code=200, output_tokens=100)
                for i in range(n)]

    metrics = SelfMetrics()
    # a node whose NVML is down: the join's GPU path as the overhead benchmarks take it
    down = NvmlCollector(nvml_config, metrics=metrics, clock=clock.ns, library_path=str(lib))
    join = Join(config("shared"), nvml=down, metrics=metrics, clock=time.monotonic, wall_clock=clock.ns)
    join.refresh()
    out: dict[str, Any] = {"history_seconds": history_s, "records": n, "other_processes_per_gpu": others,
                           "no_gpu_us_per_record": round(per_record_us(join, records(os.getpid(), 10.0), repeat), 2),
                           "gpu": []}
    examples: dict[str, Any] = {}
    for layout in LAYOUTS:
        for gpus in gpu_counts:
            server = os.getpid() if layout == "shared" else SERVER_PID
            on_gpus: int | list[int] = server if layout == "shared" else [SERVER_PID + 1 + i for i in range(gpus)]
            scenario.set(scenario_values(gpus, others, on_gpus, clock.ns() // 1000))
            nvml = NvmlCollector(nvml_config, metrics=metrics, clock=clock.ns, library_path=str(lib))
            nvml.start()
            try:
                if not nvml.devices():
                    raise RuntimeError("the fake NVML showed no GPU")
                for _ in range(history_s):  # one sample per simulated second
                    clock.advance(1.0)
                    scenario.update({f"gpu{i}.proc{k}.ts_us": clock.ns() // 1000
                                     for i in range(gpus) for k in range(others + 1)})
                    nvml.sample_now()
                join = Join(config(layout), nvml=nvml, metrics=metrics, clock=time.monotonic, wall_clock=clock.ns)
                join(records(server, 1.0)[0])  # the server is known to serve...
                join.refresh()  # ...and its pod's processes are grouped
                for window in windows:
                    batch = records(server, window)
                    attrs = join(batch[0]).attributes
                    if len(attrs.get(A_UUIDS, ())) != gpus:
                        raise RuntimeError(f"a record came out of the join without its {gpus} GPUs: {dict(attrs)}")
                    out["gpu"].append({"layout": layout, "gpus": gpus, "window_s": window,
                                       "samples_per_gpu": attrs.get(A_SAMPLES, 0) // gpus,
                                       "us_per_record": round(per_record_us(join, batch, repeat), 2)})
                    examples[layout] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()
                                        if k.startswith("gpu.")}
            finally:
                nvml.stop()
    out["example_attributes"] = examples
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history-seconds", type=int, default=600,
                    help="simulated seconds of NVML history, one sample a second (default 600, the collector's)")
    ap.add_argument("--records", type=int, default=2000, help="records per timed loop")
    ap.add_argument("--repeat", type=int, default=3, help="timed loops; the best is printed")
    ap.add_argument("--gpus", type=parse_sweep, default=(1, 8), help="GPU counts per process (comma-separated)")
    ap.add_argument("--windows", default="0.5,10,60",
                    help="request lengths in seconds (comma-separated)")
    ap.add_argument("--others", type=int, default=3, help="other processes on each GPU")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    windows = tuple(float(x) for x in a.windows.split(",") if x.strip())
    if a.history_seconds < 1 or a.records < 1 or a.repeat < 1 or a.others < 0:
        ap.error("--history-seconds, --records and --repeat must be at least 1, --others at least 0")
    if not a.gpus or any(not 1 <= g <= 8 for g in a.gpus):
        ap.error("--gpus: 1 to 8 GPUs (the fake NVML's most)")
    if not windows or any(w <= 0 or w > a.history_seconds for w in windows):
        ap.error("--windows: lengths above 0 and within --history-seconds")
    result = bench(a.history_seconds, a.records, a.gpus, windows, a.others, a.repeat)
    print_result(result, a.json, 24)
    return 0


if __name__ == "__main__":
    sys.exit(main())
