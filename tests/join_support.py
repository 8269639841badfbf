"""Shared pieces of the join's tests: a recorded-style /proc tree, kubelet cgroup paths,
the fake NVML scenario base, and polling."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

S = 1_000_000_000
NODE = "node-a"
GPU0 = "GPU-11111111-2222-3333-4444-555555555555"
GPU1 = "GPU-66666666-7777-8888-9999-000000000000"
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
MIG_B = "MIG-aaaaaaaa-0000-0000-0000-000000000002"

#: Two GPUs: GPU0 whole (H100), GPU1 split into two MIG devices.
NVML_BASE: dict[str, object] = {
    "driver": 1,
    "gpus": 2,
    "gpu0.uuid": GPU0,
    "gpu0.name": "NVIDIA H100 80GB HBM3",
    "gpu0.pci": "00000000:17:00.0",
    "gpu0.mem_total": 85_899_345_920,
    "gpu0.mem_used": 21_474_836_480,
    "gpu0.util_gpu": 60,
    "gpu0.util_mem": 12,
    "gpu0.power_mw": 300_000,
    "gpu0.energy_mj": 1_000_000_000,
    "gpu1.uuid": GPU1,
    "gpu1.name": "NVIDIA A100-SXM4-40GB",
    "gpu1.pci": "00000000:65:00.0",
    "gpu1.mem_total": 40_000_000_000,
    "gpu1.mem_used": 6_000_000_000,
    "gpu1.util_gpu": 0,
    "gpu1.util_mem": 0,
    "gpu1.power_mw": 100_000,
    "gpu1.energy_mj": 500_000_000,
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
    "gpu1.mig1.mem_total": 10_000_000_000,
    "gpu1.mig1.mem_used": 1_000_000_000,
    "gpu1.proc_util": 0,  # NVML has no per-process utilisation in MIG mode
}


def new_uid() -> str:
    return str(uuid.uuid4())


def new_cid() -> str:
    return secrets.token_hex(32)


def systemd_path(pod_uid: str, container_id: str, qos: str = "burstable") -> str:
    """The cgroup v2 path the kubelet's systemd driver and containerd give a container."""
    return (f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{pod_uid.replace('-', '_')}.slice/"
            f"cri-containerd-{container_id}.scope")


def write_proc(root: Path, pid: int, cgroup_path: str, start: int = 4242) -> None:
    """``/proc/<pid>/{stat,cgroup}`` as the kernel writes them (cgroup v2, one line)."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(f"0::{cgroup_path}\n")
    rest = " ".join(["S", "1", str(pid)] + ["0"] * 16 + [str(start)] + ["0"] * 30)
    (d / "stat").write_text(f"{pid} (python3) {rest}\n")


class ManualClock:
    """A clock tests move by hand: ``ns()`` for wall-clock ns, ``s()`` for monotonic seconds."""

    def __init__(self, t_ns: int = 1_700_000_000 * S) -> None:
        self.t = t_ns

    def ns(self) -> int:
        return self.t

    def s(self) -> float:
        return self.t / 1e9

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * S)


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``pred`` until it is truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.02)


@contextmanager
def serve_text(body: str) -> Iterator[str]:
    """An HTTP server in a thread answering every GET with ``body`` (a dcgm-exporter's
    ``/metrics``); yields its URL."""
    data = body.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
