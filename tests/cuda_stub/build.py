"""Build the stub CUDA libraries and test programs with gcc.

``build(out)`` compiles into ``out``:

* ``libcuda.so.1`` and ``libcudart.so.12``: stubs with the real API signatures
  (the runtime calls the driver, as NVIDIA's does);
* ``app``: the pattern program, linked with both stubs (run it with
  ``LD_LIBRARY_PATH`` pointing at the libraries: no rpath, so a test can put
  them somewhere else, such as a bind mount in another mount namespace);
* ``app_dlopen``: the same program without CUDA libraries, which dlopen()s
  one late;
* ``sizes``: prints sizeof() of the structs of probes/cuda.h.

Raises ``subprocess.CalledProcessError`` (with gcc's output) when a build fails.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBES = HERE.parent.parent / "probes"

# -fno-ipa-icf: gcc would otherwise fold identical stub bodies into one address,
# which the real libraries never do and which would hide double counting.
CFLAGS = ["-O1", "-fno-ipa-icf", "-Wall", "-Wno-unused-parameter", "-I", str(HERE)]


@dataclass(frozen=True)
class StubBuild:
    dir: Path
    libcuda: Path
    libcudart: Path
    app: Path
    app_dlopen: Path
    sizes: Path


def _gcc(*args: str | Path) -> None:
    subprocess.run(["gcc", *CFLAGS, *map(str, args)], check=True, capture_output=True, text=True)


def build(out: Path) -> StubBuild:
    out.mkdir(parents=True, exist_ok=True)
    b = StubBuild(out, out / "libcuda.so.1", out / "libcudart.so.12", out / "app", out / "app_dlopen", out / "sizes")
    _gcc("-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", b.libcuda, HERE / "libcuda_stub.c")
    _gcc("-shared", "-fPIC", "-Wl,-soname,libcudart.so.12", "-o", b.libcudart, HERE / "libcudart_stub.c",
         f"-L{out}", "-l:libcuda.so.1", "-Wl,-rpath,$ORIGIN")
    _gcc("-o", b.app, HERE / "app.c", f"-L{out}", "-Wl,--no-as-needed", "-l:libcuda.so.1", "-l:libcudart.so.12",
         "-Wl,--as-needed", "-ldl")
    _gcc("-o", b.app_dlopen, HERE / "app.c", "-ldl")
    _gcc("-I", PROBES, "-o", b.sizes, HERE / "sizes.c")
    return b
