"""The kernel's HTTP/2 frame walk, record by record, with real eBPF.

A bare-socket server (tests/servers/h2_raw.py) reads with tiny recv() calls,
so frame headers and payloads are cut across syscalls, and writes with one
sendmsg() of many small iovecs, so they are cut across iovecs. The records the
probe sends are checked against the frames that went over the wire: which are
forwarded, which are aggregated, the payload bytes captured (also when they
continue in a later syscall), and the per-stream totals.
"""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hpack import Encoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, PingFrame, SettingsFrame, WindowUpdateFrame

from probes.socket_events import (
    DIR_IN,
    DIR_OUT,
    H2_PREFACE_TYPE,
    H2F_AGG,
    H2K_FRAME,
    H2K_MORE,
    H2K_RAW,
    Decoder,
    H2Event,
    unpack,
)
from probes.sockets import SocketProbe, SocketProbeConfig
from tests.harness import REPO, wait_for

pytestmark = pytest.mark.ebpf

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 7  # no frame header survives one read whole


def grpc_msg(body: bytes) -> bytes:
    return b"\0" + len(body).to_bytes(4, "big") + body


def frame(f: Frame) -> bytes:
    return bytes(f.serialize())


def headers(enc: Encoder, sid: int, fields: list[tuple[str, str]], end: bool = False) -> bytes:
    f = HeadersFrame(sid, enc.encode(fields))
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return frame(f)


def data(sid: int, payload: bytes, end: bool = False) -> bytes:
    f = DataFrame(sid, payload)
    if end:
        f.flags.add("END_STREAM")
    return frame(f)


class Peer:
    def __init__(self, tmp: Path, iov_size: int) -> None:
        port_file = tmp / "port"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.servers.h2_raw", str(port_file), str(READ_SIZE), str(iov_size)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        port = int(wait_for(lambda: port_file.exists() and port_file.read_text(), 10, what="h2_raw port"))
        self.port = port

    def exchange(self, sock: socket.socket, send: bytes, reply: bytes) -> bytes:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"expect": len(send), "reply": reply.hex()}) + "\n")
        self.proc.stdin.flush()
        sock.sendall(send)
        got = b""
        while len(got) < len(reply):
            got += sock.recv(65536)
        assert self.proc.stdout.readline().strip() == "done"
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def probe() -> Iterator[tuple[SocketProbe, list[bytes]]]:
    records: list[bytes] = []
    p = SocketProbe(SocketProbeConfig(), on_records=lambda b: records.extend(unpack(b)))
    assert p.wait_h2(), "HTTP/2 capture did not load"
    yield p, records
    p.close()


def h2_records(p: SocketProbe, records: list[bytes], pid: int) -> list[H2Event]:
    time.sleep(0.1)
    p.drain(50)
    dec = Decoder(p.config.layout)
    out = []
    for raw in records:
        ev = dec.decode(raw)
        if isinstance(ev, H2Event) and ev.tgid == pid:
            out.append(ev)
    return out


def captured(events: list[H2Event], direction: int) -> list[tuple[int, int, int, int, bytes, H2Event]]:
    """(type, flags, sid, flen, payload with its H2K_MORE continuations, record) per forwarded frame."""
    frames: list[list] = []
    for ev in events:
        if ev.dir != direction:
            continue
        if ev.kind == H2K_FRAME:
            frames.append([ev.ftype, ev.fflags, ev.sid, ev.flen, ev.payload, ev])
        elif ev.kind == H2K_MORE:
            assert frames and frames[-1][2] == ev.sid
            frames[-1][4] += ev.payload
        else:
            raise AssertionError(f"unexpected record kind {ev.kind}")
    return [tuple(f) for f in frames]  # type: ignore[misc]


def test_frames_cut_across_reads_and_iovecs(probe: tuple[SocketProbe, list[bytes]], tmp_path: Path) -> None:
    p, records = probe
    peer = Peer(tmp_path, iov_size=7)
    try:
        p.add_target(peer.proc.pid)
        cenc, senc = Encoder(), Encoder()
        path = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
                (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
        req_hdr = headers(cenc, 1, path)
        # three request messages: two in the first DATA frame, the third cut
        # over two frames (its 5-byte prefix too)
        m1, m2, m3 = grpc_msg(b"\n\x06simple" + b"A" * 40), grpc_msg(b"B" * 30), grpc_msg(b"C" * 50)
        req = (PREFACE + frame(SettingsFrame(0)) + frame(WindowUpdateFrame(0, 1000)) + req_hdr
               + data(1, m1 + m2) + frame(PingFrame(0, b"12345678")) + data(1, m3[:3])
               + data(1, m3[3:], end=True))
        resp_hdr = headers(senc, 1, [(":status", "200"), ("content-type", "application/grpc")])
        outs = [grpc_msg(b"out%d" % i * 10) for i in range(5)]
        trailers = headers(senc, 1, [("grpc-status", "0")], end=True)
        resp = (frame(SettingsFrame(0)) + resp_hdr + b"".join(data(1, m) for m in outs) + trailers)
        assert len(resp) // 7 < 64  # the gathered iovecs hold it all
        got = peer.exchange(socket.create_connection(("127.0.0.1", peer.port)), req, resp)
        assert got == resp
        events = h2_records(p, records, peer.proc.pid)
    finally:
        peer.stop()

    client = captured(events, DIR_IN)
    server = captured(events, DIR_OUT)
    # forwarded: the preface, SETTINGS, HEADERS, the first DATA, and the header of
    # the DATA that ends the request; WINDOW_UPDATE, PING and the middle DATA stay in the kernel
    assert [(t, s) for t, _, s, *_ in client] == [(H2_PREFACE_TYPE, 0), (4, 0), (1, 1), (0, 1), (0, 1)]
    assert client[0][4] == PREFACE
    assert client[2][4] == req_hdr[9:] and client[2][3] == len(req_hdr) - 9
    assert client[3][4] == m1 + m2  # payload reassembled across 7-byte reads
    assert client[4][1] & 1 and client[4][4] == b"" and client[4][3] == len(m3) - 3
    assert [(t, s) for t, _, s, *_ in server] == [(4, 0), (1, 1), (0, 1), (1, 1)]
    assert server[1][4] == resp_hdr[9:]
    assert server[2][4] == outs[0]
    assert server[3][4] == trailers[9:]
    # the trailers carry both directions' totals
    end = server[3][5]
    assert end.hflags & H2F_AGG and end.agg is not None
    a_in, a_out = end.agg
    assert (a_in.frames, a_in.msgs, a_in.bytes, a_in.lost) == (3, 3, len(m1 + m2 + m3), False)
    assert (a_out.frames, a_out.msgs, a_out.bytes, a_out.lost) == (5, 5, sum(map(len, outs)), False)
    assert 0 < a_out.first_ns <= a_out.last_ns
    assert not any(ev.kind == H2K_RAW for ev in events)


def test_more_frames_than_the_walk_takes_go_raw(probe: tuple[SocketProbe, list[bytes]], tmp_path: Path) -> None:
    """One write of 400 frames is more than the tail-call chain walks: that
    direction loses sync, which is counted, and its bytes go out raw."""
    p, records = probe
    peer = Peer(tmp_path, iov_size=1 << 16)
    try:
        p.add_target(peer.proc.pid)
        before = p.counters()["h2_desync"]
        enc = Encoder()
        req = PREFACE + frame(SettingsFrame(0)) + headers(enc, 1, [(":method", "GET"), (":path", "/")], end=True)
        resp = b"".join(frame(PingFrame(0, b"%08d" % i)) for i in range(400))
        peer.exchange(socket.create_connection(("127.0.0.1", peer.port)), req, resp)
        more = frame(PingFrame(0, b"87654321"))
        events = h2_records(p, records, peer.proc.pid)
        assert p.counters()["h2_desync"] == before + 1
    finally:
        peer.stop()
    raws = [ev for ev in events if ev.kind == H2K_RAW]
    assert len(raws) == 1 and raws[0].dir == DIR_OUT
    # the raw record starts at a frame boundary the walk reached
    assert 0 < raws[0].flen < len(resp) and raws[0].flen % len(more) == 0
    assert raws[0].payload == resp[len(resp) - raws[0].flen :][: len(raws[0].payload)]


def test_no_h2_mode_before_the_walk_is_loaded(tmp_path: Path) -> None:
    """Until the HTTP/2 module is in place a preface does not switch a
    connection (its records would have nowhere to go): it stays non-HTTP/1."""
    records: list[bytes] = []
    p = SocketProbe(SocketProbeConfig(), on_records=lambda b: records.extend(unpack(b)))
    try:
        assert p.wait_h2()
        p.bpf[p._t("h2_ready")][ctypes.c_int(0)] = ctypes.c_uint32(0)  # as before the load finished
        peer = Peer(tmp_path, iov_size=64)
        try:
            p.add_target(peer.proc.pid)
            enc = Encoder()
            req = PREFACE + frame(SettingsFrame(0)) + headers(enc, 1, [(":method", "GET"), (":path", "/")], end=True)
            peer.exchange(socket.create_connection(("127.0.0.1", peer.port)), req, frame(SettingsFrame(0)))
            events = h2_records(p, records, peer.proc.pid)
            k = p.counters()
        finally:
            peer.stop()
        assert events == [] and k["h2_conns"] == 0
    finally:
        p.close()
