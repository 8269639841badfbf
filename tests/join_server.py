"""The demo server doing "GPU work" through a CUDA runtime, for the join's end-to-end test.

At the start of every POST, before the demo app answers, it calls the runtime loaded
from ``--cudart`` (the stub ``libcudart.so.12`` of tests/cuda_stub) as an inference
server would: ``--launches`` ``cudaLaunchKernel`` calls, one ``cudaMemcpy`` of
``--copy-bytes`` host to device, and one ``cudaDeviceSynchronize``. The library is
loaded at start-up, so the CUDA probe finds it mapped when it first scans the process.

Run: ``python -m tests.join_server --port 8000 --cudart /path/libcudart.so.12``.
"""

from __future__ import annotations

import argparse
import ctypes
from typing import Any

from agent.demo_server import make_app

CUDA_MEMCPY_HOST_TO_DEVICE = 1


class Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


def load_runtime(path: str) -> ctypes.CDLL:
    """Open the runtime with the real signatures of the three calls used."""
    rt = ctypes.CDLL(path)
    rt.cudaLaunchKernel.argtypes = [ctypes.c_void_p, Dim3, Dim3, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                    ctypes.c_void_p]
    rt.cudaLaunchKernel.restype = ctypes.c_int
    rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rt.cudaMemcpy.restype = ctypes.c_int
    rt.cudaDeviceSynchronize.argtypes = []
    rt.cudaDeviceSynchronize.restype = ctypes.c_int
    return rt


class CudaWork:
    """Raw ASGI middleware: the CUDA calls of one request, then the wrapped app."""

    def __init__(self, app: Any, rt: ctypes.CDLL, launches: int, copy_bytes: int) -> None:
        self.app = app
        self.rt = rt
        self.launches = launches
        self.host = ctypes.create_string_buffer(copy_bytes)
        self.device = ctypes.c_void_p(0x7F0000000000)  # the stub never dereferences device pointers

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            grid, block = Dim3(1, 1, 1), Dim3(128, 1, 1)
            for _ in range(self.launches):
                if self.rt.cudaLaunchKernel(None, grid, block, None, 0, None) != 0:
                    raise RuntimeError("cudaLaunchKernel failed")
            if self.rt.cudaMemcpy(self.device, self.host, len(self.host), CUDA_MEMCPY_HOST_TO_DEVICE) != 0:
                raise RuntimeError("cudaMemcpy failed")
            if self.rt.cudaDeviceSynchronize() != 0:
                raise RuntimeError("cudaDeviceSynchronize failed")
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cudart", required=True, help="path of the CUDA runtime library to load")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--copy-bytes", type=int, default=4096)
    a = ap.parse_args(argv)
    app = CudaWork(make_app(), load_runtime(a.cudart), a.launches, a.copy_bytes)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", loop="asyncio", access_log=False)


if __name__ == "__main__":
    main()
