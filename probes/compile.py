"""One BCC compile at a time in this process.

libbcc's compiler (clang and LLVM inside it) is not thread-safe: two ``BPF()``
constructions running at once in two threads crash the process (a segmentation
fault, or a module that fails to load). The agent compiles the capture module at
start-up and its HTTP/2 and TLS modules in a background thread after the
attach; the CUDA probe and a second socket probe (tests, benchmarks) compile
too. Every compile in the agent takes this lock.
"""

from __future__ import annotations

import threading
from typing import Any

COMPILE_LOCK = threading.Lock()


def compile_bpf(**kwargs: Any) -> Any:
    """``bcc.BPF(**kwargs)``, holding :data:`COMPILE_LOCK`."""
    from bcc import BPF

    with COMPILE_LOCK:
        return BPF(**kwargs)
