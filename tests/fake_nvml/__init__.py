"""Build and drive the fake ``libnvidia-ml.so.1`` (``fake_nvml.c``).

The library is compiled against the official ``nvml.h`` from PyPI
``nvidia-nvml-dev``, so struct layouts and signatures are NVIDIA's. Tests load
it in-process: :class:`collectors.nvml.NvmlCollector` takes ``library_path``
and opens it with ``ctypes.CDLL`` before ``nvmlInit``; pynvml's own
``CDLL("libnvidia-ml.so.1")`` then finds the already-loaded library by its
soname.

Its state is a ``key=value`` scenario file (format documented at the top of
``fake_nvml.c``) named by ``$FAKE_NVML_SCENARIO`` and re-read when it changes.
Without one, the fake answers ``NVML_ERROR_DRIVER_NOT_LOADED``.

pynvml keeps the library it loaded for the life of the process, so every test
in one pytest process shares the first library loaded; tests switch GPUs by
switching scenario files, never libraries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
SCENARIO_ENV = "FAKE_NVML_SCENARIO"


class FakeNvmlUnavailable(RuntimeError):
    """The fake cannot be built here (no C compiler or no nvml.h)."""


def nvml_include_dir() -> Path:
    """The directory holding ``nvml.h`` inside the installed ``nvidia-nvml-dev``."""
    try:
        dist = metadata.distribution("nvidia-nvml-dev")
    except metadata.PackageNotFoundError as e:
        raise FakeNvmlUnavailable("PyPI package nvidia-nvml-dev is not installed") from e
    for f in dist.files or ():
        if f.name == "nvml.h":
            return Path(str(dist.locate_file(f))).parent
    raise FakeNvmlUnavailable("nvidia-nvml-dev has no nvml.h")


def build(out_dir: Path) -> Path:
    """Compile the fake into ``out_dir/libnvidia-ml.so.1`` and return its path.

    Raises :class:`FakeNvmlUnavailable` when gcc or the header is missing, and
    ``subprocess.CalledProcessError`` when the source does not compile.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FakeNvmlUnavailable("gcc not found")
    out = out_dir / "libnvidia-ml.so.1"
    cmd = [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-Wl,-soname,libnvidia-ml.so.1",
           f"-I{nvml_include_dir()}", str(SOURCE), "-o", str(out), "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


class Scenario:
    """A scenario file the fake reads; :meth:`write` replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, str] = {}

    def set(self, values: Mapping[str, object]) -> None:
        """Replace the whole state with ``values`` and write it."""
        self.values = {}
        self.update(values)

    def update(self, changes: Mapping[str, object | None]) -> None:
        """Apply ``changes`` (dotted keys; None deletes) and write."""
        for k, v in changes.items():
            if v is None:
                self.values.pop(k, None)
            else:
                self.values[k] = str(v)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}={v}\n" for k, v in self.values.items()))
        # rename gives a new inode, so the fake sees the change even within one mtime tick
        os.replace(tmp, self.path)
