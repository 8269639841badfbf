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
    assert p.wait_tls(60)  # the uprobes' module, loaded in the background after the attach
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


def test_hooks_asked_for_before_the_tls_module_loads_are_placed_once_it_does(tmp_path: Path) -> None:
    """The agent attaches before the uprobes' copy of the data path is compiled (in the
    background): an OpenSSL found then is reported as hooked, and hooked once the module is
    in place; one without the symbols is reported unhooked at once."""
    metrics = SelfMetrics()
    p = SocketProbe(SocketProbeConfig(tls=True), on_records=lambda _: None, metrics=metrics)
    ssl = spawn(tmp_path, "sslstatic", STATIC_OPENSSL_LIKE)
    plain = spawn(tmp_path, "plain", PLAIN)
    try:
        assert not p.tls_ready.is_set() and p.tlsbpf is None
        assert p.attach_tls(ssl.pid) == "hooked"
        assert p.attach_tls(plain.pid) == "none"
        assert metrics.get("infersight.tls.libraries.hooked") == 0  # not yet placed
        assert p.wait_tls(60)
        assert metrics.get("infersight.tls.libraries.hooked") == 1
        assert metrics.get("infersight.tls.symbols.missing", (("symbol", "SSL_read_ex"),)) == 1
        assert len(p.tlsbpf.uprobe_fds) == 4  # SSL_read and SSL_write, entry and return
    finally:
        for proc in (ssl, plain):
            proc.kill()
            proc.wait(5)
        p.close()
