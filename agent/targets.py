"""Which processes to trace.

Targets are given by PID, by a port they listen on, or by command name. With
none given, known inference servers are discovered: vLLM, SGLang, Triton, TGI,
Ollama, llama.cpp's server (native and Python), plus any process listening on
the ports they use by default.

The agent never targets itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent import procfs

# Substrings of the command name or of an argv token (basename) that mark a
# known inference server. Python servers run as "python3", so argv counts.
KNOWN_SERVERS: tuple[str, ...] = (
    "vllm",
    "sglang",
    "tritonserver",
    "text-generation-launcher",
    "text-generation-router",
    "text-generation-server",
    "text-generation",
    "ollama",
    "llama-server",
    "llama_cpp.server",
)
# Default ports of vLLM/TGI/Triton (8000), llama.cpp and TGI docker (8080),
# Ollama (11434) and SGLang (30000).
DEFAULT_PORTS: tuple[int, ...] = (8000, 8080, 11434, 30000)


@dataclass(frozen=True)
class TargetConfig:
    """What to trace. Empty pids/ports/comms means: discover known servers."""

    pids: tuple[int, ...] = ()
    """Trace these processes and their children (those alive now and those forked later)."""
    ports: tuple[int, ...] = ()
    """Trace processes listening on these TCP ports."""
    comms: tuple[str, ...] = ()
    """Trace processes whose command name or an argv basename contains one of these."""
    rescan_s: float = 5.0
    """Period of the full /proc rescan that backs up exec/listen events."""
    known_servers: tuple[str, ...] = field(default=KNOWN_SERVERS)
    default_ports: tuple[int, ...] = field(default=DEFAULT_PORTS)

    @property
    def discover(self) -> bool:
        return not (self.pids or self.ports or self.comms)


class TargetSelector:
    """Decides, from /proc, whether a process is a target. Pure reads of /proc;
    thread-safe because it keeps no state but its configuration."""

    def __init__(self, config: TargetConfig, *, proc: str = "/proc", self_pid: int | None = None) -> None:
        self.config = config
        self.proc = proc
        self.self_pid = os.getpid() if self_pid is None else self_pid

    def _names(self, pid: int) -> list[str]:
        names = []
        c = procfs.comm(pid, self.proc)
        if c:
            names.append(c)
        for arg in procfs.cmdline(pid, self.proc)[:8]:
            names.append(os.path.basename(arg))
            names.append(arg)
        return names

    def matches(self, pid: int, listeners: dict[str, dict[int, int]] | None = None) -> bool:
        """Whether ``pid`` is a target. ``listeners``: listening sockets by network namespace
        (:func:`procfs.listening_sockets`), filled and reused over one scan."""
        if pid == self.self_pid or pid <= 1:
            return False
        cfg = self.config
        if pid in cfg.pids:
            return True
        words = cfg.comms if not cfg.discover else cfg.known_servers
        if words:
            names = self._names(pid)
            if any(w in n for w in words for n in names):
                return True
        ports = cfg.ports if not cfg.discover else cfg.default_ports
        if ports and self._listens_on(pid, ports, listeners):
            return True
        return False

    def _listens_on(self, pid: int, ports: tuple[int, ...], listeners: dict[str, dict[int, int]] | None) -> bool:
        fds = procfs.socket_fds(pid, self.proc)
        if not fds:
            # no socket: its namespace's table is not read (reading /proc/PID/net/tcp walks the
            # kernel's whole TCP hash table, milliseconds even when it holds nothing)
            return False
        ns = procfs.netns(pid, self.proc) if listeners is not None else None
        table = listeners.get(ns) if listeners is not None and ns is not None else None
        if table is None:
            table = procfs.listening_sockets(pid, self.proc)
            if listeners is not None and ns is not None:
                listeners[ns] = table
        return any(table.get(inode) in ports for inode in fds.values())

    def scan(self) -> set[int]:
        """All processes that are targets now."""
        found = set()
        cfg = self.config
        roots = {p for p in cfg.pids if os.path.exists(f"{self.proc}/{p}") and p != self.self_pid}
        if roots:
            # worker processes (uvicorn --workers, gunicorn) serve for their parent
            found |= roots | (procfs.descendants(roots, self.proc) - {self.self_pid})
        if cfg.pids and not cfg.ports and not cfg.comms:
            return found
        # a namespace's listening sockets are read once a scan, not once per process in it
        listeners: dict[str, dict[int, int]] = {}
        for pid in procfs.pids(self.proc):
            if pid not in found and self.matches(pid, listeners):
                found.add(pid)
        return found
