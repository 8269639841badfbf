"""BCC's compiler is not thread-safe: two ``BPF()`` constructions at once crash the
process. The agent compiles its HTTP/2 and TLS modules in a background thread
after the attach, so every compile it makes holds one lock (probes/compile.py).
Each case runs in a child process, which a crash would end with a signal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.ebpf

TWO_PROBES = """
import threading
from probes.sockets import SocketProbe, SocketProbeConfig

first = SocketProbe(SocketProbeConfig(tls=True), on_records=lambda _: None)
first.start_h2()  # the TLS and HTTP/2 modules compile in the background from here on
probes = []
threads = [threading.Thread(target=lambda: probes.append(SocketProbe(on_records=lambda _: None))) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert first.wait_tls(120) and first.wait_h2(120), "a background module did not load"
assert len(probes) == 2, "a probe failed to load"
for p in (*probes, first):
    p.close()
print("three probes, two modules")
"""

def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_probes_compiled_at_once_in_several_threads_load() -> None:
    r = _run(TWO_PROBES)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "three probes, two modules" in r.stdout


def test_without_the_lock_the_same_compiles_crash() -> None:
    """The test above can fail: with the lock taken away, the same probes end the process."""
    unlocked = "import contextlib, probes.compile\nprobes.compile.COMPILE_LOCK = contextlib.nullcontext()\n"
    results = [_run(unlocked + TWO_PROBES).returncode for _ in range(3)]
    assert any(rc != 0 for rc in results), results
