"""An idle agent sleeps on the ring buffer between the kernel's forced wakeups,
instead of waking on the drain timer, with real eBPF: a new listener wakes it at
once, nothing else wakes it before its idle wait, and a pipeline whose threads
wait that long still stops promptly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from agent.targets import TargetConfig
from probes.socket_events import PK_LISTEN, Decoder, ProcEvent, unpack
from probes.sockets import SocketProbe, SocketProbeConfig
from tests.harness import running_agent

pytestmark = pytest.mark.ebpf

LISTENER = ("import socket, sys, time\n"
            "s = socket.socket()\n"
            "s.bind(('127.0.0.1', 0))\n"
            "s.listen()\n"
            "print('listening', flush=True)\n"
            "time.sleep(30)\n")


def make_idle(p: SocketProbe) -> None:
    """Drain until a drain finds the ring buffer empty."""
    for _ in range(100):
        if p.drain(0) == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the ring buffer never emptied")


@pytest.fixture
def long_wait() -> Iterator[tuple[SocketProbe, list[bytes]]]:
    records: list[bytes] = []
    p = SocketProbe(SocketProbeConfig(idle_wait_s=60.0), on_records=lambda b: records.extend(unpack(b)))
    try:
        yield p, records
    finally:
        p.close()


def test_a_new_listener_wakes_an_idle_drain(long_wait: tuple[SocketProbe, list[bytes]]) -> None:
    p, records = long_wait
    make_idle(p)
    records.clear()
    done = threading.Event()

    def drain() -> None:
        p.drain(50)  # idle: waits up to 60 s for a forced wakeup
        done.set()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    child = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "listening"
        # woken by the listen, far before the idle wait ends
        assert done.wait(20), "the listen did not wake the idle drain"
        dec = Decoder(p.config.layout)
        events = [dec.decode(r) for r in records]
        listens = [e for e in events if isinstance(e, ProcEvent) and e.kind == PK_LISTEN and e.tgid == child.pid]
        assert listens, events
    finally:
        child.kill()
        child.wait(5)
        t.join(70)


def test_an_idle_drain_waits_out_its_idle_wait() -> None:
    p = SocketProbe(SocketProbeConfig(idle_wait_s=1.0), on_records=lambda _: None)
    try:
        make_idle(p)
        t0 = time.monotonic()
        n = p.drain(50)
        waited = time.monotonic() - t0
        # the drain timer (50 ms) did not wake it: only the idle wait, or a forced wakeup,
        # which a quiet machine does not produce in a second
        assert n == 0 and waited >= 0.9, (n, waited)
    finally:
        p.close()


def test_a_pipeline_with_long_waits_stops_promptly() -> None:
    with subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True) as srv:
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
            with running_agent(TargetConfig(pids=(srv.pid,), rescan_s=60.0)):
                time.sleep(1.5)  # every thread is in its longest wait
                threads = [t for t in threading.enumerate() if t.name.startswith("infersight-")]
                assert {t.name for t in threads} >= {"infersight-drain", "infersight-assembly",
                                                     "infersight-discovery"}
                t0 = time.monotonic()
            took = time.monotonic() - t0  # the pipeline's stop, on leaving the block
            # the discovery thread waits up to 60 s for its rescan, the drain up to its idle wait
            assert took < 5.0, took
            assert not any(t.is_alive() for t in threads), threads
        finally:
            srv.kill()


def test_a_ring_buffer_too_small_for_the_wakeup_keeps_the_drain_timer() -> None:
    # 16 pages hold fewer than 256 data records of the largest size: waiting for the forced
    # wakeup could let the ring fill first, so an idle drain wakes on its timer
    p = SocketProbe(SocketProbeConfig(idle_wait_s=30.0, ringbuf_pages=16), on_records=lambda _: None)
    try:
        make_idle(p)
        t0 = time.monotonic()
        p.drain(50)
        assert time.monotonic() - t0 < 5.0
    finally:
        p.close()
