"""Reading processes and sockets from /proc.

Every function takes a ``proc`` root (default ``/proc``; a DaemonSet mounts the
host's at ``/host/proc``) so tests can point it at a recorded tree.

Nothing here raises for a process that vanished: it returns None or empty
results, because targets die at any moment.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TCP_ESTABLISHED = 1
TCP_LISTEN = 10


@dataclass(frozen=True, slots=True)
class SockInfo:
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    state: int


_PR_SET_NAME = 15  # prctl(2)


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` as the kernel shows it (``/proc/PID/task/TID/comm``,
    ``top -H``, ``perf``; the first 15 bytes). Python names its threads for itself only.
    Nothing happens where prctl cannot be called."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def pids(proc: str = "/proc") -> Iterator[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for n in names:
        if n.isdigit():
            yield int(n)


def comm(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read().strip().decode("utf-8", "replace")
    except OSError:
        return None


def cmdline(pid: int, proc: str = "/proc") -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def tgid_of(pid: int, proc: str = "/proc") -> int | None:
    """The thread group (process) a task id belongs to."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """Process start time in clock ticks (stat field 22): tells PID reuse apart."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def ppid(pid: int, proc: str = "/proc") -> int | None:
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int, proc: str = "/proc") -> list[int] | None:
    """The process's children, from its threads' ``children`` files; ``[]`` once it is gone,
    None where the kernel has no such file (built without ``CONFIG_PROC_CHILDREN``)."""
    base = f"{proc}/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"{base}/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"{base}/{tid}"):
                return None  # the thread is there, the file is not
        except (OSError, ValueError):
            continue  # the thread exited meanwhile
    return out


def descendants(roots: set[int], proc: str = "/proc") -> set[int]:
    """Every live process below ``roots`` (children, grandchildren, ...): read from the
    roots' and their children's ``children`` files, or where the kernel has none, from every
    process's parent."""
    by_parent: dict[int, list[int]] | None = None
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        kids = children(pid, proc) if by_parent is None else by_parent.get(pid, [])
        if kids is None:  # no children files: every process's parent instead, from the roots again
            by_parent = {}
            for p in pids(proc):
                parent = ppid(p, proc)
                if parent is not None:
                    by_parent.setdefault(parent, []).append(p)
            out, todo = set(), list(roots)
            continue
        for child in kids:
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def socket_fds(pid: int, proc: str = "/proc") -> dict[int, int]:
    """fd → socket inode for every socket the process holds."""
    out: dict[int, int] = {}
    base = f"{proc}/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(fd)] = int(target[8:-1])
    return out


def socket_inode(pid: int, fd: int, proc: str = "/proc") -> int | None:
    try:
        target = os.readlink(f"{proc}/{pid}/fd/{fd}")
    except OSError:
        return None
    if target.startswith("socket:["):
        return int(target[8:-1])
    return None


def _addr4(hexaddr: str) -> str:
    return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(hexaddr, 16)))


def _addr6(hexaddr: str) -> str:
    words = [int(hexaddr[i : i + 8], 16) for i in range(0, 32, 8)]
    raw = struct.pack("<4I", *words)
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:])  # v4-mapped: report the v4 address
    return socket.inet_ntop(socket.AF_INET6, raw)


def _tcp_rows(pid: int, proc: str) -> Iterator[tuple[Callable[[str], str], str]]:
    """The rows of ``pid``'s network namespace's TCP tables (IPv4, then IPv6), each with the
    function that reads its addresses; a table that cannot be read is skipped."""
    for name, conv in (("tcp", _addr4), ("tcp6", _addr6)):
        try:
            with open(f"{proc}/{pid}/net/{name}") as f:
                next(f, None)  # the column names
                for line in f:
                    yield conv, line
        except OSError:
            continue


def read_tcp_table(pid: int, proc: str = "/proc") -> dict[int, SockInfo]:
    """inode → socket info for the TCP sockets of ``pid``'s network namespace."""
    out: dict[int, SockInfo] = {}
    for conv, line in _tcp_rows(pid, proc):
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            la, lp = parts[1].split(":")
            ra, rp = parts[2].split(":")
            inode = int(parts[9])
            if inode == 0:
                continue
            out[inode] = SockInfo(conv(la), int(lp, 16), conv(ra), int(rp, 16), int(parts[3], 16))
        except (ValueError, OSError):
            continue
    return out


def netns(pid: int, proc: str = "/proc") -> str | None:
    """The process's network namespace (``net:[inode]``), or None when it cannot be read."""
    try:
        return os.readlink(f"{proc}/{pid}/ns/net")
    except OSError:
        return None


def listening_sockets(pid: int, proc: str = "/proc") -> dict[int, int]:
    """inode → port of the listening TCP sockets (IPv4 and IPv6) in ``pid``'s network
    namespace. Reads only the listening rows' port and inode: cheaper than
    :func:`read_tcp_table` on a host with many connections."""
    out: dict[int, int] = {}
    for _, line in _tcp_rows(pid, proc):
        if " 0A " not in line:  # the state column, TCP_LISTEN (nothing else is "0A" alone)
            continue
        parts = line.split()
        if len(parts) < 10 or parts[3] != "0A":
            continue
        try:
            inode = int(parts[9])
            if inode:
                out[inode] = int(parts[1].rpartition(":")[2], 16)
        except ValueError:
            continue
    return out


def listening_in(table: dict[int, SockInfo], fds: dict[int, int]) -> set[int]:
    """Ports the sockets ``fds`` (fd -> inode) listen on, given their namespace's TCP table."""
    inodes = set(fds.values())
    return {s.local_port for ino, s in table.items() if ino in inodes and s.state == TCP_LISTEN}


class SocketTable:
    """Cached inode → socket lookups, refreshed on a miss at most every
    ``min_refresh_s`` per network namespace (reading /proc/net/tcp costs
    milliseconds on busy hosts). Not thread-safe: one owner thread."""

    def __init__(self, proc: str = "/proc", min_refresh_s: float = 0.2, max_entries: int = 65536) -> None:
        self.proc = proc
        self.min_refresh_s = min_refresh_s
        self.max_entries = max_entries
        self._tables: dict[str, tuple[float, dict[int, SockInfo]]] = {}

    def lookup(self, pid: int, inode: int) -> SockInfo | None:
        ns = netns(pid, self.proc) or f"pid:{pid}"
        entry = self._tables.get(ns)
        if entry is not None and inode in entry[1]:
            return entry[1][inode]
        now = time.monotonic()
        if entry is not None and now - entry[0] < self.min_refresh_s:
            return None
        table = read_tcp_table(pid, self.proc)
        if len(table) > self.max_entries:
            table = dict(list(table.items())[: self.max_entries])
        if len(self._tables) > 64:
            self._tables.clear()
        self._tables[ns] = (now, table)
        return table.get(inode)


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """(address, port) from a struct sockaddr_in/sockaddr_in6 as captured."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("<H", raw)[0]
    port = struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        addr = raw[8:24]
        if addr[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, addr[12:]), port
        return socket.inet_ntop(socket.AF_INET6, addr), port
    return None
