"""The demo inference server over HTTP/2 and TLS: hypercorn (HTTP/2 with ALPN
"h2", TLS from Python's ssl module, so from the system's OpenSSL) serving
agent.demo_server's app.

Run: ``python -m tests.servers.h2_tls PORT CERTFILE KEYFILE``.
"""

from __future__ import annotations

import asyncio
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from agent.demo_server import make_app


def main() -> None:
    port, certfile, keyfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.certfile = certfile
    cfg.keyfile = keyfile
    cfg.alpn_protocols = ["h2"]
    cfg.accesslog = None
    asyncio.run(serve(make_app(), cfg))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
