"""Compiled builds of the per-record path, with mypyc.

    python -m agent.native build     # compile in place (a no-op when current)
    python -m agent.native status    # which modules run compiled

Every request the agent sees goes through the same Python: ring buffer
records decoded, HTTP/1 framing, SSE and LLM body reading, assembly, the
join and the metric instruments. mypyc compiles those modules, unchanged,
to C extensions: the same source, type-checked by mypy, runs with native
attribute access and calls. ``bench.stages`` shows what it buys.

The extensions are built next to their sources (``agent/http1.py`` gets
``agent/http1.cpython-311-x86_64-linux-gnu.so``), where Python's import
system prefers them. A stamp, ``agent/.native-stamp.json``, holds the
SHA-256 of each source that was compiled, so a source edited after the
build shows as ``stale`` here, in ``infersight doctor`` and in the agent's
start-up log, and the test suite refuses to run against it. Nothing else
changes: without a build (no compiler, or ``--pure`` images) the same
modules run as plain Python.

Four modules are C written by hand. ``agent/_httphead.c`` reads the HTTP/1.1
message head in one pass, where the Python parser makes a dozen calls into ``re``
and ``bytes``. It reads only the common form and returns None for anything
else; ``agent/http1.py`` then reads the head itself, and its Python reading
is also used whenever the extension is not built. Tests compare the two on
generated heads. A whole request, or a response head framed by chunked coding or a
Content-Length, is also read with only its framing fields and the one field the
assembler takes (``H1Parser.take_request_head``, ``take_response_head``), without
the parser's events; tests hold that to feeding the same bytes. ``agent/_llmjson.c`` reads OpenAI-compatible JSON bodies in one
validating pass for the few fields ``agent/llm.py`` takes from them, leaving
anything unusual to ``json``; tests hold it to ``json`` on generated documents.
``probes/_ringdrain.c`` takes the ring buffer's records into a list in one call,
where BCC calls Python once per record, and ``probes/_recread.c`` reads the data and
summary records among them in one pass each, where ``struct`` makes an int of every
field and Python slices the payload; tests hold it to the Python reading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / "agent" / ".native-stamp.json"

#: The modules on the per-record path, relative to the directory holding ``agent/``.
MODULES = (
    "agent/values.py",
    "agent/clock.py",
    "agent/http1.py",
    "agent/sse.py",
    "agent/ndjson.py",
    "agent/llm.py",
    "agent/assemble.py",
    "agent/kserve.py",
    "agent/pipeline.py",
    "agent/selfmetrics.py",
    "agent/export/instruments.py",
    "agent/export/exporters.py",
    "agent/export/sampling.py",
    "agent/export/routes.py",
    "agent/export/rpc.py",
    "agent/record.py",
    "probes/socket_events.py",
    "agent/join.py",
    "collectors/cgroup.py",
    "collectors/history.py",
    "agent/http2.py",
    "agent/h2wire.py",
)

#: Hand-written C for what mypyc cannot make fast (regular expressions stay calls into
#: ``re``, ctypes callbacks stay Python calls); the module that imports each keeps a Python
#: path for when it is not built.
C_MODULES = ("agent/_httphead.c", "agent/_llmjson.c", "probes/_ringdrain.c", "probes/_recread.c")

#: Every source with an extension built from it.
SOURCES = MODULES + C_MODULES

#: The stamp's record of the modules compiled together, which share one library.
GROUP_KEY = "modules"
GROUP = " ".join(MODULES)

#: mypyc's runtime shared by the modules, kept inside the package so that it imports
#: wherever ``agent`` does (an editable install maps packages, not the checkout's root).
SHARED = "agent/_compiled__mypyc"
_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extension(module: str, root: Path = ROOT) -> Path:
    return root / (module.rsplit(".", 1)[0] + _SUFFIX)


def module_name(source: str) -> str:
    """The importable name of a source: ``agent/http1.py`` is ``agent.http1``."""
    return source.rsplit(".", 1)[0].replace("/", ".")


def _stamp(root: Path = ROOT) -> dict[str, str]:
    try:
        data = json.loads((root / STAMP.relative_to(ROOT)).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def status(root: Path = ROOT) -> dict[str, str]:
    """Each module: ``compiled`` (its extension matches the source), ``stale`` (an extension
    built from another version of the source; Python still loads it), or ``source``."""
    stamp = _stamp(root)
    # a build of another module list (its shared library holds other modules, which the
    # compiled ones import from it instead of from their sources) is stale throughout
    same_group = stamp.get(GROUP_KEY) == GROUP
    out = {}
    for m in SOURCES:
        if not _extension(m, root).exists():
            out[m] = "source"
        elif same_group and stamp.get(m) == _digest(root / m):
            out[m] = "compiled"
        else:
            out[m] = "stale"
    # an extension left by a build whose module list differed: Python would load it
    expected = {_extension(m, root) for m in (*SOURCES, SHARED + ".py")}
    for ext in _extensions_on_disk(root):
        if ext not in expected:
            out[str(ext.relative_to(root))[: -len(_SUFFIX)] + ".py"] = "stale"
    return out


def _extensions_on_disk(root: Path) -> list[Path]:
    dirs = sorted({(root / m).parent for m in SOURCES})
    return [p for d in dirs for p in sorted(d.glob("*" + _SUFFIX))]


def summary(st: dict[str, str]) -> str:
    """One line for logs and doctor from a :func:`status`: how many modules run compiled, and
    which are stale."""
    compiled = sum(1 for v in st.values() if v == "compiled")
    stale = sorted(m for m, v in st.items() if v == "stale")
    text = f"{compiled} of {len(st)} per-record modules compiled (mypyc, C)"
    if stale:
        text += "; stale (rebuild with python -m agent.native build): " + ", ".join(stale)
    return text


def clean() -> None:
    """Remove every extension and the stamp: the modules run as plain Python."""
    for ext in _extensions_on_disk(ROOT):
        ext.unlink()
    STAMP.unlink(missing_ok=True)


def build(force: bool = False, python: str | None = None) -> bool:
    """Compile every module in place unless all are current. True when it compiled.

    ``python``: the interpreter whose installed packages mypy reads for the modules'
    imports (default: this one). The image build runs mypyc from an environment of its
    own and points it at the agent's, so that mypy never lands in the image.
    """
    if not force and all(v == "compiled" for v in status().values()):
        return False
    clean()
    digests = {m: _digest(ROOT / m) for m in SOURCES}
    digests[GROUP_KEY] = GROUP
    c_exts = [(module_name(m), m) for m in C_MODULES]
    with tempfile.TemporaryDirectory(prefix="infersight-native-") as tmp:
        # the options of [tool.mypy] in pyproject.toml, which an installed package lacks
        options = ["--python-executable", python or sys.executable, "--ignore-missing-imports",
                   "--check-untyped-defs", *MODULES]
        script = Path(tmp) / "setup_native.py"
        script.write_text(
            "from setuptools import setup\n"
            "from setuptools import Extension\n"
            "from mypyc.build import mypycify\n"
            f"c_exts = [Extension(n, [s], extra_compile_args=['-O2']) for n, s in {c_exts!r}]\n"
            f"setup(name='infersight-native', ext_modules=c_exts + mypycify({options!r}, opt_level='3',"
            f" group_name={SHARED.removesuffix('__mypyc').replace('/', '.')!r}, target_dir={str(Path(tmp) / 'c')!r}), script_args=['-q', 'build_ext', '--inplace',"
            f" '--build-temp', {str(Path(tmp) / 'o')!r}])\n"
        )
        env = dict(os.environ, MYPY_CACHE_DIR=str(Path(tmp) / "cache"))
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            clean()
            raise RuntimeError("mypyc build failed:\n" + (proc.stdout + proc.stderr)[-4000:])
    # a source edited while it compiled stays stale rather than stamped
    STAMP.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    return True


def copy_to(target: Path, root: Path = ROOT) -> None:
    """Copy a current build into another installation of the same sources (the image builds in
    its source tree, where mypy sees a clean source root, and copies into the venv)."""
    if not all(v == "compiled" for v in status(root).values()):
        raise RuntimeError("nothing current to copy: build first")
    for m in SOURCES:
        if not (target / m).is_file() or _digest(target / m) != _digest(root / m):
            raise RuntimeError(f"{target / m} is not the source that was compiled")
    for m in (*SOURCES, SHARED + ".py"):
        shutil.copy2(_extension(m, root), _extension(m, target))
    stamp = STAMP.relative_to(ROOT)
    shutil.copy2(root / stamp, target / stamp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.native", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("build", "status", "clean", "copy-to"))
    ap.add_argument("target", nargs="?", type=Path, help="copy-to: the directory holding another agent/")
    ap.add_argument("--force", action="store_true", help="build: compile even when current")
    ap.add_argument("--python", help="build: the interpreter whose packages the modules import (default: this one)")
    a = ap.parse_args(argv)
    if a.command == "build":
        try:
            built = build(a.force, a.python)
        except (RuntimeError, ImportError, OSError) as e:
            print(f"native: {e}", file=sys.stderr)
            return 1
        print(("compiled: " if built else "current: ") + summary(status()))
        return 0
    if a.command == "copy-to":
        if a.target is None:
            ap.error("copy-to needs a target directory")
        try:
            copy_to(a.target)
        except (RuntimeError, OSError) as e:
            print(f"native: {e}", file=sys.stderr)
            return 1
        print(f"copied to {a.target}: " + summary(status(a.target)))
        return 0
    if a.command == "clean":
        clean()
        print("removed: " + summary(status()))
        return 0
    st = status()
    for m, v in st.items():
        print(f"{v:9s} {m}")
    return 0 if "stale" not in st.values() else 1


if __name__ == "__main__":
    sys.exit(main())
