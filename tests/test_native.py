"""The compiled per-record modules (agent/native.py): which build Python loads, and staleness."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import native
from tests.conftest import IN_CI, REPO


def _tree(tmp: Path, compiled: tuple[str, ...]) -> Path:
    """A copy of the modules' sources under ``tmp``, with a (dummy) extension and a stamp for
    those in ``compiled``."""
    for m in native.SOURCES:
        (tmp / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / m, tmp / m)
    stamp = {native.GROUP_KEY: native.GROUP}
    for m in compiled:
        native._extension(m, tmp).write_bytes(b"\x7fELF")
        stamp[m] = native._digest(tmp / m)
    (tmp / native.STAMP.relative_to(native.ROOT)).write_text(json.dumps(stamp))
    return tmp


def test_status_tells_compiled_stale_and_source(tmp_path: Path) -> None:
    http1, llm = "agent/http1.py", "agent/llm.py"
    root = _tree(tmp_path, (http1, llm))
    st = native.status(root)
    assert st[http1] == "compiled" and st[llm] == "compiled"
    assert {v for m, v in st.items() if m not in (http1, llm)} == {"source"}
    # an edit after the build: Python would still load the old extension
    with open(root / llm, "a") as f:
        f.write("\n# edited\n")
    assert native.status(root)[llm] == "stale"
    assert "stale (rebuild with python -m agent.native build): agent/llm.py" in native.summary(native.status(root))
    # an extension without a stamp entry is stale too: nothing says what it was built from
    (root / native.STAMP.relative_to(native.ROOT)).unlink()
    assert native.status(root)[http1] == "stale"


def test_an_extension_of_a_module_no_longer_compiled_is_stale(tmp_path: Path) -> None:
    root = _tree(tmp_path, native.SOURCES)
    native._extension(native.SHARED + ".py", root).write_bytes(b"\x7fELF")
    assert set(native.status(root).values()) == {"compiled"}
    (root / "agent/h2wire.py").write_text("")
    native._extension("agent/h2wire.py", root).write_bytes(b"\x7fELF")
    assert native.status(root)["agent/h2wire.py"] == "stale"


def test_a_build_of_another_module_list_is_stale_throughout(tmp_path: Path) -> None:
    # its shared library may hold a module since dropped from the list, which the compiled
    # modules would import from it instead of from its source
    root = _tree(tmp_path, native.SOURCES)
    stamp_path = root / native.STAMP.relative_to(native.ROOT)
    stamp = json.loads(stamp_path.read_text())
    stamp[native.GROUP_KEY] = native.GROUP + " collectors/history.py"
    stamp_path.write_text(json.dumps(stamp))
    assert set(native.status(root).values()) == {"stale"}
    del stamp[native.GROUP_KEY]  # a stamp from before the list was recorded
    stamp_path.write_text(json.dumps(stamp))
    assert set(native.status(root).values()) == {"stale"}


def test_copy_to_installs_a_build_only_over_the_same_sources(tmp_path: Path) -> None:
    built = _tree(tmp_path / "src", native.SOURCES)
    native._extension(native.SHARED + ".py", built).write_bytes(b"\x7fELF")
    venv = _tree(tmp_path / "venv", ())
    assert set(native.status(venv).values()) == {"source"}
    native.copy_to(venv, built)
    assert set(native.status(venv).values()) == {"compiled"}
    assert native._extension(native.SHARED + ".py", venv).exists()
    other = _tree(tmp_path / "other", ())
    with open(other / "agent/http1.py", "a") as f:
        f.write("\n# another version\n")
    with pytest.raises(RuntimeError, match="not the source that was compiled"):
        native.copy_to(other, built)
    assert set(native.status(other).values()) == {"source"}


def test_the_checkout_runs_what_status_reports() -> None:
    st = native.status()
    assert "stale" not in st.values(), "conftest refuses a stale build; this cannot be reached"
    if IN_CI:
        assert set(st.values()) == {"compiled"}, st
    for m, state in st.items():
        name = native.module_name(m)
        if m in native.C_MODULES:
            # no Python source: importable exactly when built
            assert (importlib.util.find_spec(name) is not None) == (state == "compiled"), (m, state)
            continue
        mod = importlib.import_module(name)
        loaded = Path(mod.__file__ or "")
        assert loaded.name.endswith(".so") == (state == "compiled"), (m, state, loaded)


def test_cli_status_lists_every_module() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.native", "status"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = dict(reversed(line.split()) for line in out.stdout.splitlines())
    assert set(rows) == set(native.SOURCES)
    assert set(rows.values()) <= {"compiled", "source"}


def test_doctor_reports_the_build() -> None:
    from agent.doctor import check_native

    c = check_native()
    st = native.status()
    assert c.required is False  # plain Python still captures
    assert c.ok == all(v == "compiled" for v in st.values())
    assert c.detail == native.summary(st)


# mypyc names a C struct field after each attribute with one more leading underscore:
# `self._thread` became `__thread`, a GCC keyword, and the whole build failed.
_GCC_KEYWORDS = re.compile(
    r"self\._(thread|asm|inline|restrict|attribute|extension|label|typeof|const|signed|volatile|complex"
    r"|real|imag|alignof)\b"
)


@pytest.mark.parametrize("module", native.MODULES)
def test_modules_hold_no_attribute_that_breaks_the_c_build(module: str) -> None:
    assert _GCC_KEYWORDS.search("self._thread = None"), "the pattern must catch the case that broke"
    found = _GCC_KEYWORDS.findall((REPO / module).read_text())
    assert not found, f"{module}: rename self._{found[0]}"
