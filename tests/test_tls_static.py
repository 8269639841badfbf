"""TLS linked into an executable is reported, never silently missed: Go's
crypto/tls cannot be hooked (``unhooked``, counted), OpenSSL/BoringSSL linked
statically is hooked in the executable itself (``hooked``). Real uprobes on
tiny programs that carry the same symbols."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.selfmetrics import SelfMetrics
from probes.sockets import SocketProbe, SocketProbeConfig

pytestmark = pytest.mark.ebpf

GO_LIKE = r"""
#include <stdio.h>
/* the symbol Go's linker gives crypto/tls's Conn.Read */
__attribute__((noinline)) int tls_read(void) __asm__("\"crypto/tls.(*Conn).Read\"");
int tls_read(void) { return 0; }
int main(void) { getchar(); return tls_read(); }
"""

STATIC_OPENSSL_LIKE = r"""
#include <stdio.h>
__attribute__((noinline)) int SSL_read(void *ssl, void *buf, int n) { (void)ssl; (void)buf; return n; }
__attribute__((noinline)) int SSL_write(void *ssl, const void *buf, int n) { (void)ssl; (void)buf; return n; }
int main(void) { char b[4]; getchar(); return SSL_read(0, b, 0) + SSL_write(0, b, 0); }
"""

PLAIN = r"""
#include <stdio.h>
int main(void) { return getchar() < -1; }
"""


def spawn(tmp: Path, name: str, src: str) -> subprocess.Popen[bytes]:
    c, exe = tmp / f"{name}.c", tmp / name
    c.write_text(src)
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(c)], check=True)
    return subprocess.Popen([str(exe)], stdin=subprocess.PIPE)


@pytest.fixture(scope="module")
def probe() -> Iterator[tuple[SocketProbe, SelfMetrics]]:
    metrics = SelfMetrics()
    p = SocketProbe(SocketProbeConfig(tls=True), on_records=lambda _: None, metrics=metrics)
    yield p, metrics
    p.close()


@pytest.mark.parametrize(
    ("name", "src", "state"),
    [("gotls", GO_LIKE, "unhooked"), ("sslstatic", STATIC_OPENSSL_LIKE, "hooked"), ("plain", PLAIN, "none")],
)
def test_tls_in_the_executable(probe: tuple[SocketProbe, SelfMetrics], tmp_path: Path, name: str, src: str,
                               state: str) -> None:
    p, metrics = probe
    go_before = metrics.get("infersight.tls.static", (("library", "go"),))
    hooked_before = metrics.get("infersight.tls.libraries.hooked")
    proc = spawn(tmp_path, name, src)
    try:
        assert p.attach_tls(proc.pid) == state
    finally:
        proc.kill()
        proc.wait(5)
    assert metrics.get("infersight.tls.static", (("library", "go"),)) - go_before == (state == "unhooked")
    assert metrics.get("infersight.tls.libraries.hooked") - hooked_before == (state == "hooked")
