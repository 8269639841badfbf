"""The ``infersight`` command: run, doctor, demo, top.

Options come, in increasing precedence, from defaults, a YAML file
(``--config``, keys named like the long options with ``_``), environment
variables (``INFERSIGHT_<OPTION>``, plus the standard ``OTEL_*`` ones the OTLP
exporter reads) and the command line.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("infersight")

RUN_OPTIONS: dict[str, tuple[Any, str]] = {
    # name: (default, help)
    "pid": ([], "trace this process and its children (repeatable)"),
    "port": ([], "trace processes listening on this TCP port (repeatable)"),
    "comm": ([], "trace processes whose name or argv contains this (repeatable)"),
    "jsonl": (None, "write one JSON record per request to PATH, or - for stdout"),
    "duration": (None, "stop after this many seconds"),
    "prometheus_port": (9464, "Prometheus endpoint port (0 disables)"),
    "prometheus_host": ("0.0.0.0", "Prometheus endpoint address"),
    "otlp_endpoint": (None, "OTLP endpoint (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset disables OTLP)"),
    "sample_ratio": (1.0, "fraction of ordinary requests exported as spans (errors, aborts, slow: always)"),
    "slow_threshold": (30.0, "requests slower than this many seconds are always exported as spans"),
    "buckets": ("", "histogram bounds by instrument, as JSON: '{\"gen_ai.server.time_to_first_token\": [0.01, 0.1, 1]}'"),
    "ringbuf_pages": (1024, "kernel ring buffer size in 4 KiB pages (power of 2)"),
    "max_conns": (16384, "connections tracked in the kernel (LRU)"),
    "trace_clients": (False, "also record requests the targets make (client spans)"),
    "tls": (False, "capture HTTPS plaintext with uprobes on the OpenSSL the targets map"),
    "syscall_args": ("auto", "where data syscalls' arguments are read: exit (saved registers, no entry "
                             "programs), entry, or auto (exit where the kernel allows it)"),
    "proc": ("/proc", "the host's /proc (a DaemonSet mounts it at /host/proc)"),
    "k8s": (True, "decorate records with Kubernetes pod metadata (needs the API server)"),
    "kube_api_url": (None, "API server URL (default: in-cluster config, then kubeconfig)"),
    "kubelet_socket": ("/var/lib/kubelet/pod-resources/kubelet.sock", "kubelet pod-resources socket"),
    "gpu": (True, "collect NVML (and DCGM) GPU metrics and join requests with GPU work"),
    "nvml_library": (None, "libnvidia-ml.so.1 to load, e.g. under a mounted driver root (default: the "
                           "dynamic loader's search, which the NVIDIA Container Toolkit's injected copy answers)"),
    "cuda": ("auto", "CUDA uprobes: on, off, or auto (on when NVML finds a GPU)"),
    "cuda_bucket_ms": (200, "CUDA activity is aggregated in the kernel per process in buckets of this length"),
    "log_level": ("info", "debug, info, warning or error"),
}


def _env_default(name: str, default: Any) -> Any:
    raw = os.environ.get("INFERSIGHT_" + name.upper())
    if raw is None:
        return default
    if isinstance(default, list):
        return [x for x in raw.replace(",", " ").split() if x]
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _load_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"infersight: {path}: expected a mapping of option names to values")
    unknown = set(data) - set(RUN_OPTIONS)
    if unknown:
        raise SystemExit(f"infersight: {path}: unknown options: {', '.join(sorted(unknown))}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infersight",
        description="eBPF observability for LLM inference servers: per-request TTFT, tokens and GPU work.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="trace inference servers and export what they serve")
    run.add_argument("--config", help="YAML file of options")
    for name, (default, help_) in RUN_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, list):
            typ = int if name in ("pid", "port") else str
            run.add_argument(flag, action="append", type=typ, default=None, help=help_)
        elif isinstance(default, bool):
            run.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            typ2: Any = type(default) if default is not None else (float if name == "duration" else str)
            run.add_argument(flag, type=typ2, default=None, help=f"{help_} (default: {default})")
    sub.add_parser("doctor", help="check what this node can do, and how to fix what it cannot")
    demo = sub.add_parser("demo", help="a streaming test server, load and the agent, on this machine")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long to run (default 20)")
    demo.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    demo.add_argument("--prometheus-port", type=int, default=0, help="also serve metrics here (0: off)")
    sub.add_parser("top", help="live per-model view of a running agent's metrics (infersight top --help)",
                   add_help=False)
    return p


def resolve_run_options(ns: argparse.Namespace) -> dict[str, Any]:
    """defaults < YAML < environment < command line"""
    yaml_opts = _load_yaml(getattr(ns, "config", None))
    out = {}
    for name, (default, _) in RUN_OPTIONS.items():
        v = yaml_opts.get(name, default)
        v = _env_default(name, v)
        cli = getattr(ns, name, None)
        if cli is not None:
            v = cli
        out[name] = v
    out["pid"] = tuple(int(x) for x in out["pid"])
    out["port"] = tuple(int(x) for x in out["port"])
    out["comm"] = tuple(str(x) for x in out["comm"])
    return out


SYSCALL_ARGS = ("auto", "exit", "entry")  # --syscall-args (the benchmarks take it too)


def exit_args_option(value: str) -> bool | None:
    """--syscall-args as SocketProbeConfig.exit_args: exit -> True, entry -> False, auto -> None."""
    v = str(value).lower()
    if v not in SYSCALL_ARGS:
        raise SystemExit(f"infersight: --syscall-args must be exit, entry or auto, not {value!r}")
    return None if v == "auto" else v == "exit"


def cmd_run(ns: argparse.Namespace) -> int:
    opts = resolve_run_options(ns)
    logging.basicConfig(
        level=getattr(logging, str(opts["log_level"]).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.assemble import AssemblyConfig
    from agent.export.exporters import ExportConfig, Exporters
    from agent.export.jsonl import JsonlSink
    from agent.pipeline import Pipeline, PipelineConfig
    from agent.targets import TargetConfig
    from probes.socket_events import Decoder
    from probes.sockets import SocketProbe, SocketProbeConfig

    probe_cfg = SocketProbeConfig(
        ringbuf_pages=opts["ringbuf_pages"], max_conns=opts["max_conns"], trace_clients=opts["trace_clients"],
        tls=opts["tls"], exit_args=exit_args_option(opts["syscall_args"]),
    )
    cfg = PipelineConfig(
        assembly=AssemblyConfig(
            sample_writes=probe_cfg.sample_writes,
            late_sample_writes=probe_cfg.late_sample_writes,
            tail_slots=probe_cfg.tail_slots,
            client_spans=opts["trace_clients"],
        ),
        targets=TargetConfig(pids=opts["pid"], ports=opts["port"], comms=opts["comm"]),
        proc=opts["proc"],
    )
    sinks: list[Any] = []
    if opts["jsonl"]:
        sinks.append(JsonlSink(opts["jsonl"]))
    exporters = Exporters(
        ExportConfig(
            otlp_endpoint=opts["otlp_endpoint"],
            prometheus_port=opts["prometheus_port"],
            prometheus_host=opts["prometheus_host"],
            sample_ratio=opts["sample_ratio"],
            slow_threshold_s=opts["slow_threshold"],
            buckets=parse_buckets(opts["buckets"]),
        )
    )
    sinks.append(exporters)
    sources = start_gpu_sources(opts)
    join = build_join(opts, sources)
    for source in sources.values():
        exporters.add_point_source(decorated_points(join, source))
    stages = [join] if join is not None else []
    if join is not None:
        exporters.add_point_source(join.points)
    cuda = sources.get("cuda")
    listeners = []
    if cuda is not None:
        def follow(pid: int, added: bool) -> None:
            (cuda.add_pid if added else cuda.remove_pid)(pid)

        listeners.append(follow)
    pipeline = Pipeline(
        cfg,
        lambda on_records: SocketProbe(probe_cfg, on_records=on_records),
        sinks,
        stages=stages,
        layout_decoder=Decoder(probe_cfg.layout),
        target_listeners=listeners,
    )
    if join is not None:
        exporters.set_active_source(lambda: join.decorate_active(pipeline.active()))
    else:
        exporters.set_active_source(pipeline.active)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: flushing and detaching", signum)
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if join is not None:
        join.start()  # the pod index lists while the probe compiles: first records get pod attributes
    try:
        pipeline.start()
    except Exception as e:
        log.error("capture cannot start: %s (run `infersight doctor`)", str(e).splitlines()[0] if str(e) else e)
        exporters.shutdown()
        stop_sources(join, sources)
        return 2
    # What start-up made (BCC and LLVM bindings, compiled programs, the exporters' SDKs) lives
    # as long as the agent: out of the cyclic collector's view, its full collections stop
    # walking it again and again under load.
    gc.freeze()
    deadline = None if opts["duration"] is None else time.monotonic() + float(opts["duration"])
    while not stop.is_set():
        # a signal ends the wait at once (its handler sets `stop`); the timeout only bounds it
        timeout = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
        stop.wait(timeout)
        if deadline is not None and time.monotonic() >= deadline:
            break
    pipeline.stop()
    stop_sources(join, sources)
    log.info("stopped: %d records", pipeline.records)
    return 0


def start_gpu_sources(opts: dict[str, Any]) -> dict[str, Any]:
    """NVML, DCGM and the CUDA probe, started; each degrades on its own (a
    missing GPU turns GPU collection off, visibly, and nothing else)."""
    sources: dict[str, Any] = {}
    if not opts["gpu"]:
        return sources
    from collectors.dcgm import DcgmCollector
    from collectors.nvml import NvmlCollector

    nvml = NvmlCollector(library_path=opts["nvml_library"])
    nvml.start()
    sources["nvml"] = nvml
    dcgm = DcgmCollector(devices=nvml.devices)
    dcgm.start()
    sources["dcgm"] = dcgm
    mode = str(opts["cuda"]).lower()
    if mode not in ("on", "off", "auto"):
        raise SystemExit(f"infersight: --cuda must be on, off or auto, not {opts['cuda']!r}")
    if mode == "on" or (mode == "auto" and nvml.devices()):
        from probes.cuda import CudaProbe, CudaProbeConfig

        ms = int(opts["cuda_bucket_ms"])
        cuda = CudaProbe(CudaProbeConfig(bucket_ns=ms * 1_000_000, poll_s=max(0.05, ms / 1000)))
        cuda.start()
        sources["cuda"] = cuda
    else:
        log.info("CUDA probe off (%s)", "no GPU found by NVML" if mode == "auto" else "--cuda off")
    return sources


def parse_buckets(raw: Any) -> dict[str, tuple[float, ...]]:
    """Bucket bounds from YAML (a mapping) or a JSON string; a clear error otherwise."""
    if not raw:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SystemExit(f"infersight: --buckets is not JSON: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise SystemExit("infersight: buckets must map instrument names to lists of bounds")
    return {str(k): tuple(float(x) for x in v) for k, v in raw.items()}


def decorated_points(join: Any, source: Any) -> Any:
    """``source.points``, with device metrics carrying the pod that holds the device."""
    if join is None:
        return source.points
    return lambda: join.decorate_points(source.points())


def build_join(opts: dict[str, Any], sources: dict[str, Any]) -> Any:
    if not opts["k8s"] and not opts["gpu"]:
        return None
    from agent.join import Join, JoinConfig

    cfg = JoinConfig(
        api_url=opts["kube_api_url"],
        kubelet_socket=opts["kubelet_socket"],
        k8s_enabled=bool(opts["k8s"]),
        gpu_enabled=bool(opts["gpu"]),
        cuda_enabled="cuda" in sources,
        dcgm_enabled="dcgm" in sources,
        proc=opts["proc"],
    )
    return Join(cfg, nvml=sources.get("nvml"), cuda=sources.get("cuda"), dcgm=sources.get("dcgm"))


def stop_sources(join: Any, sources: dict[str, Any]) -> None:
    if join is not None:
        join.stop()
    for name, source in sources.items():
        try:
            source.stop()
        except Exception:
            log.exception("stopping %s failed", name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["top"]:
        # `top` has options of its own (agent/top.py); hand them over untouched
        from agent.top import main as top_main

        return top_main(args[1:])
    ns = build_parser().parse_args(args)
    if ns.command == "run":
        return cmd_run(ns)
    if ns.command == "doctor":
        from agent.doctor import main as doctor_main

        return doctor_main([])
    if ns.command == "demo":
        from agent.demo import main as demo_main

        return demo_main(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
