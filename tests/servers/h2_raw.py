"""A bare-socket peer for the kernel's HTTP/2 frame walk: it accepts one
connection, reads it with small fixed-size recv() calls until the client's
marker byte count has arrived, then writes prepared bytes with one sendmsg()
of many small iovecs (the way grpc-core writes frames: headers and payloads as
separate slices, cut anywhere).

Run: ``python -m tests.servers.h2_raw PORT_FILE READ_SIZE IOV_SIZE`` and feed
it, on stdin, one JSON line per exchange: ``{"expect": n, "reply": hex}``: read
n bytes, then write ``reply`` in iovecs of IOV_SIZE bytes. Prints ``done``
after each exchange.
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> None:
    port_file, read_size, iov_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    with open(port_file, "w") as f:
        f.write(str(ls.getsockname()[1]))
    conn, _ = ls.accept()
    for line in sys.stdin:
        cmd = json.loads(line)
        got = 0
        while got < cmd["expect"]:
            chunk = conn.recv(read_size)
            if not chunk:
                return
            got += len(chunk)
        reply = bytes.fromhex(cmd["reply"])
        if reply:
            iovs = [reply[i : i + iov_size] for i in range(0, len(reply), iov_size)]
            while iovs:
                # at most 1024 iovecs per call (IOV_MAX)
                sent = conn.sendmsg(iovs[:1024])
                take = 0
                while iovs and take + len(iovs[0]) <= sent:
                    take += len(iovs.pop(0))
                if iovs and sent > take:
                    iovs[0] = iovs[0][sent - take :]
        print("done", flush=True)
    conn.close()


if __name__ == "__main__":
    main()
