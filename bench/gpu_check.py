"""Checks on a node with an NVIDIA GPU, against PyTorch: the CUDA probe, NVML and the whole agent.

Two parts, each printing what it expected and what it measured:

* ``probe``: a PyTorch process runs phases of known CUDA work (5000 element-wise
  kernels, 300 device synchronizes, 8 MiB copies each way, 64 MiB allocations
  freed with ``empty_cache``, CUDA graph replays, then two seconds of bf16
  matrix products) with idle gaps between them. :class:`probes.cuda.CudaProbe`
  attaches to the libcudart and libcuda that process really maps, and each
  phase's window is compared with the counts the workload knows. The NVML
  collector samples meanwhile; its device and per-process windows over the
  matrix phase are compared with ``nvidia-smi``.
* ``agent``: ``infersight run`` traces a streaming server whose every token is
  decoded on the GPU (a stack of bf16 matrix products, then an argmax read back
  to the host). Sequential OpenAI-style streaming requests, each after a pause
  of over one CUDA bucket; each record must carry the model, the output count,
  a TTFT within 2 ms of the server's own first write, and the GPU join (device,
  memory peak, CUDA launches), and the records' launches must add up to the
  probe's exported total. The prompt text must appear in none of the agent's
  output.

Without PyTorch or a GPU the ``agent`` part still runs (tokens are timed
sleeps), and its GPU checks fail; tests/test_bench_gpu_check.py runs it so.

Needs root, BCC, NVML and PyTorch with CUDA. Run from the repository root::

    python -m bench.gpu_check --out DIR [--part probe|agent|all]

Prints one JSON object and writes it to ``DIR/gpu_check.json``. Exits 1 when a
check failed; ``info`` entries are measurements with no pass mark.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import require_root
from bench.overhead import REPO, free_port

MIB = 1 << 20

# Part "probe": phase sizes, known to both sides.
ADDS = 5000
SYNCS = 300
COPIES = 40
COPY_BYTES = 8 * MIB
ALLOCS = 20
ALLOC_BYTES = 64 * MIB
GRAPH_REPLAYS = 200
GRAPH_ADDS = 10
BUSY_S = 2.0
GAP_S = 0.6
BUCKET_MS = 100

# Part "agent".
MODEL = "gpu-check-decoder"
LAYERS = 24
WIDTH = 8192
ROWS = 64
TOKENS = 48
REQUESTS = 20
PROMPT_MARKER = "PROMPT-MARKER-7f3e9c1d"
AGENT_BUCKET_MS = 100
PAUSE_S = 0.15


def _now() -> int:
    return time.time_ns()


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: the other process polls for the file."""
    tmp = path.with_suffix(".part")
    tmp.write_text(text)
    tmp.rename(path)


# ---------------------------------------------------------------------------- workload


def workload(ready: Path, go: Path, out: Path, stop: Path) -> None:
    """The traced process of part "probe": warm everything up, wait, run the phases."""
    import torch

    dev = torch.device("cuda")
    x = torch.ones(1024, device=dev)
    y = torch.empty_like(x)
    pinned = torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
    dbuf = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    gx = torch.ones(1024, device=dev)
    # Warm-up: every op once (lazy module loading, cuBLAS handles), and the graph captured.
    torch.add(x, 1, out=y)
    dbuf.copy_(pinned)
    pinned.copy_(dbuf)
    t = torch.empty(ALLOC_BYTES, dtype=torch.uint8, device=dev)
    del t
    torch.mm(a, b, out=c)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            gx.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_ADDS):
            gx.add_(1)
    g.replay()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _write(ready, json.dumps({"pid": os.getpid(), "torch": torch.__version__, "cuda": torch.version.cuda,
                                 "device": torch.cuda.get_device_name(0)}))
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    phases: dict[str, Any] = {}

    def phase(name: str, fn: Any) -> None:
        time.sleep(GAP_S)
        t0 = _now()
        extra = fn()
        phases[name] = {"t0": t0, "t1": _now(), **(extra or {})}

    def adds() -> None:
        for _ in range(ADDS):
            torch.add(x, 1, out=y)
        torch.cuda.synchronize()

    def syncs() -> None:
        for _ in range(SYNCS):
            torch.cuda.synchronize()

    def copies() -> None:
        for _ in range(COPIES):
            dbuf.copy_(pinned)
        for _ in range(COPIES):
            pinned.copy_(dbuf)
        torch.cuda.synchronize()

    def allocs() -> None:
        for _ in range(ALLOCS):
            t = torch.empty(ALLOC_BYTES, dtype=torch.uint8, device=dev)
            del t
            torch.cuda.empty_cache()

    def graphs() -> None:
        for _ in range(GRAPH_REPLAYS):
            g.replay()
        torch.cuda.synchronize()

    def busy() -> dict[str, Any]:
        n = 0
        end = time.monotonic() + BUSY_S
        while time.monotonic() < end:
            for _ in range(20):
                torch.mm(a, b, out=c)
            n += 20
            torch.cuda.synchronize()
        return {"matmuls": n, "reserved_bytes": torch.cuda.memory_reserved()}

    phase("adds", adds)
    phase("syncs", syncs)
    phase("copies", copies)
    phase("allocs", allocs)
    phase("graphs", graphs)
    phase("busy", busy)
    _write(out, json.dumps(phases))
    deadline = time.monotonic() + 60
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _await_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    """Wait for ``path``, which ``proc`` writes; raise if ``proc`` exits or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} (exit status {proc.poll()})")
        time.sleep(0.05)


def _smi_process_memory() -> dict[int, int]:
    """pid -> used GPU memory in bytes, as nvidia-smi reports it."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1]) * MIB
    return out


def _self_metrics(metrics: Any, *prefixes: str) -> dict[str, float]:
    """Non-zero self-metrics whose names start with one of ``prefixes``."""
    return {f"{s.name}{dict(s.labels) if s.labels else ''}": s.value for s in metrics.snapshot()
            if s.value and s.name.startswith(prefixes)}


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def check(self, name: str, ok: bool, expected: Any, measured: Any) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "expected": expected, "measured": measured})

    def info(self, name: str, measured: Any) -> None:
        self.checks.append({"check": name, "ok": None, "measured": measured})


def part_probe(tmp: Path, report: Report) -> None:
    from agent.selfmetrics import SELF_METRICS
    from collectors.nvml import NvmlCollector, NvmlConfig
    from probes.cuda import CudaProbe, CudaProbeConfig

    files = {k: tmp / f"probe-{k}" for k in ("ready", "go", "out", "stop")}
    for f in files.values():
        f.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "_workload",
                              *(str(files[k]) for k in ("ready", "go", "out", "stop"))], cwd=REPO)
    probe = None
    nvml = None
    try:
        _await_file(files["ready"], child, 180, "the workload did not start")
        ready = json.loads(files["ready"].read_text())
        report.facts["workload"] = ready
        pid = ready["pid"]
        maps = [ln.split()[-1] for ln in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/libcud" in ln]
        report.facts["cuda_libraries_mapped"] = sorted(set(maps))

        nvml = NvmlCollector(NvmlConfig(period_s=0.1))
        nvml.start()
        t_attach = time.monotonic()
        probe = CudaProbe(CudaProbeConfig(bucket_ns=BUCKET_MS * 1_000_000, poll_s=0.1, settle_ns=50_000_000))
        report.check("cuda probe loaded", probe.enabled, True, probe.enabled)
        probe.add_pid(pid)
        probe.rescan()
        probe.start()
        report.facts["cuda_attach_s"] = round(time.monotonic() - t_attach, 2)
        libs = probe.libraries(pid)
        report.facts["cuda_libraries_attached"] = [
            {"kind": lib.kind, "path": lib.path, "attached": len(lib.attached), "missing": list(lib.missing),
             "failed": list(lib.failed)} for lib in libs]
        report.check("libcudart and libcuda attached", {lib.kind for lib in libs if lib.attached} >= {"driver", "runtime"},
                     ["driver", "runtime"], sorted({lib.kind for lib in libs if lib.attached}))
        files["go"].write_text("go")
        _await_file(files["out"], child, 120, "the workload did not finish its phases")
        phases = json.loads(files["out"].read_text())
        # The workload holds its memory until told to stop, so this is the matrix phase's too.
        smi = _smi_process_memory().get(pid)
        time.sleep(0.5)
        nvml.sample_now()
        probe.poll(flush=True)

        part_probe_cuda(probe, pid, phases, report)
        report.info("cuda self-metrics", _self_metrics(SELF_METRICS, "infersight.cuda"))
        part_probe_nvml(nvml, pid, phases, smi, report)
        report.info("nvml self-metrics", _self_metrics(SELF_METRICS, "infersight.collector", "infersight.gpu",
                                                       "infersight.nvml"))
    finally:
        files["stop"].write_text("stop")
        if probe is not None:
            probe.stop()
        if nvml is not None:
            nvml.stop()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def part_probe_cuda(probe: Any, pid: int, phases: dict[str, Any], report: Report) -> None:
    """Each phase's CUDA window against the counts the workload knows."""
    def win(name: str) -> Any:
        p = phases[name]
        return probe.window(pid, p["t0"], p["t1"])

    w = win("adds")
    report.check("adds: kernel launches", w and w.launches == ADDS, ADDS, w and w.launches)
    w = win("syncs")
    report.check("syncs: synchronize calls", w and w.sync_calls == SYNCS, SYNCS, w and w.sync_calls)
    report.check("syncs: no launches", w and w.launches == 0, 0, w and w.launches)
    w = win("copies")
    report.check("copies: host to device bytes", w and w.memcpy_htod_bytes == COPIES * COPY_BYTES,
                 COPIES * COPY_BYTES, w and w.memcpy_htod_bytes)
    report.check("copies: device to host bytes", w and w.memcpy_dtoh_bytes == COPIES * COPY_BYTES,
                 COPIES * COPY_BYTES, w and w.memcpy_dtoh_bytes)
    report.info("copies: synchronize calls", w and w.sync_calls)
    w = win("allocs")
    report.check("allocs: bytes allocated", w and w.alloc_bytes == ALLOCS * ALLOC_BYTES,
                 ALLOCS * ALLOC_BYTES, w and w.alloc_bytes)
    report.check("allocs: bytes freed", w and w.free_bytes == ALLOCS * ALLOC_BYTES,
                 ALLOCS * ALLOC_BYTES, w and w.free_bytes)
    w = win("graphs")
    report.check("graphs: graph launches", w and w.graph_launches == GRAPH_REPLAYS, GRAPH_REPLAYS,
                 w and w.graph_launches)
    report.check("graphs: no kernel launches", w and w.launches == 0, 0, w and w.launches)
    busy = phases["busy"]
    w = win("busy")
    report.info("busy: cuBLAS matmuls run / kernel launches seen", [busy["matmuls"], w and w.launches])


def part_probe_nvml(nvml: Any, pid: int, phases: dict[str, Any], smi: int | None, report: Report) -> None:
    """NVML's device and per-process windows over the matrix phase."""
    busy = phases["busy"]
    devs = nvml.devices()
    report.facts["nvml_devices"] = [d.attributes() for d in devs]
    report.check("nvml: a device", len(devs) >= 1, ">= 1", len(devs))
    if devs:
        dw = nvml.device_window(devs[0].uuid, busy["t0"], busy["t1"])
        util = dw.mean.get("utilization.gpu") if dw else None
        report.check("nvml: device utilisation over the matrix phase", util is not None and util >= 0.8,
                     ">= 0.8", util)
        report.info("nvml: device means over the matrix phase", dw and dw.mean)
    pw = nvml.process_window(pid, busy["t0"], busy["t1"])
    report.info("nvml: process means over the matrix phase", pw and pw.mean)
    mem = pw.max.get("process.memory.used") if pw else None
    report.check("nvml: process memory equals nvidia-smi's",
                 mem is not None and smi is not None and abs(mem - smi) <= MIB, smi, mem)
    report.check("nvml: the workload's pid is on the GPU", pid in nvml.processes(), True, pid in nvml.processes())
    report.info("nvml: points", sorted({(p.name, round(float(p.value), 3)) for p in nvml.points()}))
    report.info("nvml: xid counts", {f"{k}": v for k, v in nvml.xid_counts().items()})


# ------------------------------------------------------------------------------ server


class _CpuDecoder:
    """Stands in for :class:`_Decoder` where PyTorch or CUDA is missing, so the agent part's
    plumbing runs anywhere (its GPU checks then fail, as they should)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def token(self) -> int:
        with self.lock:
            time.sleep(0.002)
            return 1


class _Decoder:
    """A decoder-shaped GPU load: per token, LAYERS bf16 products and an argmax read back."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        g = torch.Generator(device="cuda").manual_seed(0)
        self.w = [torch.randn(WIDTH, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g) / 90
                  for _ in range(LAYERS)]
        self.h = torch.randn(ROWS, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g)
        self.lock = threading.Lock()
        self.token()

    def token(self) -> int:
        torch = self.torch
        with self.lock:
            h = self.h
            for w in self.w:
                h = torch.relu(h @ w)
            self.h = h / (h.abs().amax() + 1)
            return int(h[0].argmax().item())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    decoder: _Decoder | _CpuDecoder
    timings: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length", "0"))
        req = json.loads(self.rfile.read(n))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        tokens = int(req.get("max_tokens", TOKENS))
        first = 0

        def send(obj: Any) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.get("model", MODEL)}
        for i in range(tokens):
            tok = self.decoder.token()
            if i == 0:
                first = _now()
            send({**base, "choices": [{"index": 0, "delta": {"content": f"t{tok} "}, "finish_reason": None}]})
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}})
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        with open(self.timings, "a") as f:
            f.write(json.dumps({"first_token_unix_nano": first, "end_unix_nano": _now()}) + "\n")


def server(timings: Path, ready: Path) -> None:
    """Serve on a free loopback port, written to ``ready`` once the decoder is warm."""
    try:
        _Handler.decoder = _Decoder()
    except (ImportError, RuntimeError) as exc:
        print(f"gpu_check server: no GPU decoder ({exc}); tokens are timed sleeps", file=sys.stderr)
        _Handler.decoder = _CpuDecoder()
    _Handler.timings = timings
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _write(ready, str(httpd.server_address[1]))
    httpd.serve_forever()



def _client(port: int) -> int:
    """One streaming request; returns the events received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": TOKENS,
                       "messages": [{"role": "user", "content": f"{PROMPT_MARKER} say something"}]})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return data.count(b"data: ")


def part_agent(tmp: Path, out_dir: Path, report: Report) -> None:
    prom = free_port()
    timings, ready, jsonl, log = (tmp / "srv-timings", tmp / "srv-ready", out_dir / "agent.jsonl",
                                  out_dir / "agent.log")
    for f in (timings, ready, jsonl):
        f.unlink(missing_ok=True)
    srv = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "_server", str(timings), str(ready)], cwd=REPO)
    agent = None
    metrics_text = ""
    try:
        _await_file(ready, srv, 180, "the server did not start")
        port = int(ready.read_text())
        t0 = time.monotonic()
        with open(log, "w") as lf:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--pid", str(srv.pid), "--jsonl", str(jsonl),
                 "--duration", "240", "--no-k8s", "--prometheus-port", str(prom), "--prometheus-host", "127.0.0.1",
                 "--cuda", "on", "--cuda-bucket-ms", str(AGENT_BUCKET_MS)], cwd=REPO, stdout=lf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "attached to" not in log.read_text():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not attach (exit {agent.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.05)
        report.facts["agent_attach_s"] = round(time.monotonic() - t0, 2)
        time.sleep(3.0)  # the CUDA probe's first rescan, and NVML's first samples
        events = []
        for _ in range(REQUESTS):
            time.sleep(PAUSE_S)  # over one CUDA bucket: each record's buckets hold its own calls only
            events.append(_client(port))
        report.check("agent: client events per request", all(e == TOKENS + 2 for e in events), TOKENS + 2,
                     sorted(set(events)))
        time.sleep(2.0)
        try:
            with urllib_open(f"http://127.0.0.1:{prom}/metrics") as r:
                metrics_text = r.read().decode()
        except OSError as exc:
            metrics_text = f"# scrape failed: {exc}"
        (out_dir / "metrics.txt").write_text(metrics_text)
        agent.send_signal(signal.SIGINT)
        report.check("agent: exit 0 on SIGINT", agent.wait(timeout=60) == 0, 0, agent.returncode)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        srv.terminate()
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
    records = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []
    chats = [r for r in records if r.get("url.path") == "/v1/chat/completions"]
    server_times = [json.loads(ln) for ln in timings.read_text().splitlines()] if timings.exists() else []
    report.check("agent: one record per request", len(chats) == REQUESTS, REQUESTS, len(chats))
    report.check("agent: model", all(r.get("gen_ai.request.model") == MODEL for r in chats), MODEL,
                 sorted({str(r.get("gen_ai.request.model")) for r in chats}))
    report.check("agent: output tokens", all(r.get("gen_ai.usage.output_tokens") == TOKENS for r in chats), TOKENS,
                 sorted({str(r.get("gen_ai.usage.output_tokens")) for r in chats}))
    # TTFT: the agent's first output event against the server's own clock at its first write.
    diffs = []
    for r in chats:
        ttft = r.get("time_to_first_token_s")
        if ttft is None:
            continue
        at = r["start_time_unix_nano"] + ttft * 1e9
        nearest = min((abs(at - s["first_token_unix_nano"]) for s in server_times), default=None)
        if nearest is not None:
            diffs.append(nearest / 1e6)
    report.check("agent: TTFT within 2 ms of the server's first write",
                 len(diffs) == len(chats) and bool(diffs) and max(diffs) <= 2.0, "<= 2 ms",
                 {"max_ms": round(max(diffs), 3) if diffs else None, "n": len(diffs)})
    report.info("agent: TTFT s (min, max)", [min(r["time_to_first_token_s"] for r in chats),
                                             max(r["time_to_first_token_s"] for r in chats)] if chats else None)
    report.info("agent: time per output token s (min, max)",
                [min(r["time_per_output_token_s"] or 0 for r in chats),
                 max(r["time_per_output_token_s"] or 0 for r in chats)] if chats else None)
    uuids = [r.get("gpu.uuids") for r in chats]
    report.check("agent: every record joined with the GPU", bool(chats) and all(uuids), "gpu.uuids on each",
                 sorted({str(u) for u in uuids}))
    launches = [r.get("gpu.window.cuda.launches") for r in chats]
    report.check("agent: CUDA launches in each record's window", bool(chats) and all(launches), "> 0",
                 sorted({str(x) for x in launches})[:6])
    # Every launch the probe counted came from a request, and the pauses keep each in one window.
    total = _metric_value(metrics_text, "gpu_cuda_kernel_launch_calls")
    report.check("agent: the records' launches add up to the probe's total",
                 bool(chats) and all(launches) and sum(launches) == total, total,
                 sum(x for x in launches if x) if chats else None)
    peaks = [r.get("gpu.window.pod.memory.peak") for r in chats]
    report.check("agent: every record has its process's GPU memory peak", bool(chats) and all(peaks),
                 "gpu.window.pod.memory.peak on each", sum(1 for x in peaks if x))
    report.info("agent: gpu.window.utilization.mean of each record",
                [r.get("gpu.window.utilization.mean") for r in chats])
    report.info("agent: GPU keys of the first record",
                {k: v for k, v in (chats[0] if chats else {}).items() if k.startswith("gpu.")})
    blob = (jsonl.read_text() if jsonl.exists() else "") + metrics_text + (log.read_text() if log.exists() else "")
    report.check("agent: the prompt appears in no output", PROMPT_MARKER not in blob, False, PROMPT_MARKER in blob)


def _metric_value(text: str, family: str) -> float | None:
    """The value of a Prometheus text exposition's one sample of ``family``, if any."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for fam in text_string_to_metric_families(text):
            if fam.name == family and len(fam.samples) == 1:
                return float(fam.samples[0].value)
    except ValueError:
        return None
    return None


def urllib_open(url: str) -> Any:
    import urllib.request

    return urllib.request.urlopen(url, timeout=10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_workload":
        workload(*(Path(a) for a in argv[1:5]))
        return 0
    if argv and argv[0] == "_server":
        server(Path(argv[1]), Path(argv[2]))
        return 0
    require_root()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/infersight-gpu-check")
    ap.add_argument("--part", choices=("probe", "agent", "all"), default="all")
    ns = ap.parse_args(argv)
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="infersight-gpu-check-"))
    report = Report()
    parts = [("probe", part_probe), ("agent", lambda t, r: part_agent(t, out_dir, r))]
    for name, fn in parts:
        if ns.part not in (name, "all"):
            continue
        try:
            fn(tmp, report)
        except Exception as exc:
            report.check(f"{name}: ran to the end", False, "no error", repr(exc))
    result = {"facts": report.facts, "checks": report.checks,
              "failed": [c["check"] for c in report.checks if c["ok"] is False]}
    shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1, default=str)
    (out_dir / "gpu_check.json").write_text(text)
    print(text)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
