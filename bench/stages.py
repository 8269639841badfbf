"""Where the agent's user-space CPU goes, stage by stage, on recorded traffic.

    python -m bench.stages --profile {json,sse,responses,unary,stream} --seconds N [--chunks K] [--save FILE] [--json]
    python -m bench.stages --load FILE [--json]

One run records what the socket probe delivers while the benchmark server
is under load (wrk for the HTTP/1 profiles, tritonclient for gRPC), then
replays the same records, in the same batches, through what ``infersight
run`` does with them, one stage more each time:

- ``decode``: the ring buffer records turned into events;
- ``assembly``: decoding, parsing and assembly into records (emitted nowhere);
- ``join``: plus the join stage as ``infersight run`` builds it by default;
- ``export``: plus the exporters (metric instruments, sampling; OTLP off);
- ``all``: join and exporters, as the agent runs.

Each figure is CPU time (``time.process_time``) per request, the best of
``--repeat`` replays, printed with records per request. Unlike the overhead
benchmark, this involves no other process competing for the cores, so it
is steady from run to run: use it to see what a change to the per-record
path buys. The agent's live CPU per request is higher (it shares the cores
with the server and the load; see docs/overhead.md).

``--save FILE`` keeps the recording; ``--load FILE`` replays a kept one
instead of recording (no server, no load, no root): two builds replaying the
same records, one after the other, compare without a recording's own
variation. A loaded recording's traced process is gone, so its join and
export stages see no process to describe; compare their decode and assembly.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import procfs
from agent.assemble import Assembler, AssemblyConfig
from agent.cli import build_join, build_parser, resolve_run_options, start_gpu_sources, stop_sources
from agent.clock import Clock
from agent.export.exporters import ExportConfig, Exporters
from agent.pipeline import Pipeline, PipelineConfig
from agent.record import Request
from bench import print_result, require_root
from probes.socket_events import Decoder, pack, unpack
from probes.sockets import SocketProbe, SocketProbeConfig

HTTP1 = ("json", "sse", "responses")
GRPC = ("unary", "stream")


def record(profile: str, seconds: float, tmp: Path, work: Callable[[list[bytes]], Any],
           chunks: int = 50) -> Any:
    """Run the profile's server and load with the probe attached; call ``work(batches)`` while the
    server still runs (the join reads its /proc entry). ``chunks``: token events per streamed
    response (the sse and responses profiles)."""
    from bench.grpc import Clients, GrpcServer
    from bench.overhead import Server, run_wrk

    batches: list[bytes] = []  # as drained: packed (probes.socket_events.pack)
    probe = SocketProbe(SocketProbeConfig(), on_records=batches.append)
    server: Any = Server(profile, chunks, otel=False) if profile in HTTP1 else GrpcServer()
    try:
        probe.add_target(server.proc.pid)
        probe.start_h2()
        if not probe.wait_h2():
            raise RuntimeError("the HTTP/2 capture did not load")
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                probe.drain(50)
            probe.drain(0)

        t = threading.Thread(target=drain, name="drain")
        t.start()
        try:
            if profile in HTTP1:
                run_wrk(server.port, profile, seconds, 8, tmp)
            else:
                Clients(server.port, profile, 4, seconds, 32 if profile == "stream" else 1, 16, tmp).go()
            time.sleep(0.5)  # the last records reach the ring buffer
        finally:
            stop.set()
            t.join()
        return work(batches)
    finally:
        probe.close()
        server.stop()


_COUNT = struct.Struct("<I")


def save(batches: list[bytes], path: Path) -> None:
    """Write a recording of drained batches: per batch its record count, then each record's
    length and bytes."""
    with open(path, "wb") as f:
        for packed in batches:
            b = unpack(packed)
            f.write(_COUNT.pack(len(b)))
            for raw in b:
                f.write(_COUNT.pack(len(raw)))
                f.write(raw)


def load(path: Path) -> list[bytes]:
    """A recording :func:`save` wrote, its batches packed as drained. Raises ValueError for a
    file cut short."""
    data = Path(path).read_bytes()
    batches: list[bytes] = []
    pos = 0
    try:
        while pos < len(data):
            (n,) = _COUNT.unpack_from(data, pos)
            pos += _COUNT.size
            batch = []
            for _ in range(n):
                (size,) = _COUNT.unpack_from(data, pos)
                pos += _COUNT.size
                if pos + size > len(data):
                    raise ValueError(f"{path}: a record cut short at byte {pos}")
                batch.append(data[pos : pos + size])
                pos += size
            batches.append(pack(batch))
    except struct.error:
        raise ValueError(f"{path}: cut short at byte {pos}") from None
    return batches


def replay(batches: list[bytes], emit: Callable[[Request], None]) -> tuple[float, int]:
    """CPU seconds to feed every batch to a fresh assembler, and the requests it emitted."""
    n = 0

    def counted(r: Request) -> None:
        nonlocal n
        n += 1
        emit(r)

    pc = SocketProbeConfig()
    asm = Assembler(
        AssemblyConfig(sample_writes=pc.sample_writes, late_sample_writes=pc.late_sample_writes,
                       tail_slots=pc.tail_slots),
        counted,
        clock=Clock(),
        decoder=Decoder(pc.layout),
        process_name=procfs.comm,
        conn_alive=lambda *_: True,
        sockets=procfs.SocketTable(),
    )
    t = time.process_time()
    for b in batches:
        asm.feed(b)
    return time.process_time() - t, n


def measure(batches: list[bytes], repeat: int) -> dict[str, Any]:
    opts = resolve_run_options(build_parser().parse_args(["run", "--prometheus-port", "0"]))
    sources = start_gpu_sources(opts)
    join = build_join(opts, sources)
    exporters = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0))
    try:
        if join is not None:
            join.start()
        stages: dict[str, Callable[[Request], None]] = {
            "assembly": lambda r: None,
            "join": Pipeline(PipelineConfig(), _no_probe, [], stages=[join] if join else [])._emit,
            "export": Pipeline(PipelineConfig(), _no_probe, [exporters])._emit,
            "all": Pipeline(PipelineConfig(), _no_probe, [exporters], stages=[join] if join else [])._emit,
        }
        records = sum(len(unpack(b)) for b in batches)
        decoder = Decoder(SocketProbeConfig().layout)
        best: dict[str, float] = {}
        requests = 0
        for _ in range(repeat):
            t = time.process_time()
            for b in batches:  # as assembly reads them: a few records at a time
                off = 0
                while off < len(b):
                    _, off = decoder.decode_some(b, off)
            best["decode"] = min(best.get("decode", float("inf")), time.process_time() - t)
            for name, emit in stages.items():
                cpu, requests = replay(batches, emit)
                best[name] = min(best.get(name, float("inf")), cpu)
    finally:
        exporters.shutdown()
        stop_sources(join, sources)
    return {
        "records": records,
        "requests": requests,
        "records_per_request": round(records / requests, 3) if requests else None,
        "cpu_us_per_request": {k: round(v / requests * 1e6, 1) for k, v in best.items()} if requests else None,
    }


def _no_probe(_on_records: Callable[[bytes], None]) -> Any:
    raise RuntimeError("replay only: the pipeline here never starts a probe")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=HTTP1 + GRPC, default="json")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="replays per stage; the best is printed")
    ap.add_argument("--chunks", type=int, default=50,
                    help="sse, responses: token events per response (compare two counts for the cost per event)")
    ap.add_argument("--save", type=Path, metavar="FILE", help="keep the recording in FILE")
    ap.add_argument("--load", type=Path, metavar="FILE", help="replay FILE's recording instead of recording")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    if a.load and a.save:
        ap.error("--load replays a recording: --save has nothing to keep")
    logging.basicConfig(level=logging.ERROR)
    if a.load:
        try:
            batches = load(a.load)
        except (OSError, ValueError) as e:
            ap.error(f"--load: {e}")
        result: dict[str, Any] = {"loaded": str(a.load)}
        result.update(measure(batches, a.repeat))
        print_result(result, a.json, 24)
        return 0
    require_root()
    result = {"profile": a.profile, "seconds": a.seconds}
    if a.profile in ("sse", "responses"):
        result["chunks"] = a.chunks

    def work(batches: list[list[bytes]]) -> dict[str, Any]:
        if a.save:
            save(batches, a.save)
        return measure(batches, a.repeat)

    with tempfile.TemporaryDirectory(prefix="infersight-stages-", ignore_cleanup_errors=True) as tmp:
        result.update(record(a.profile, a.seconds, Path(tmp), work, a.chunks))
    print_result(result, a.json, 24)
    return 0


if __name__ == "__main__":
    sys.exit(main())
