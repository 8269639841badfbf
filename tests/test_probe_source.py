"""The probes' C text keeps BCC's front end off its slow path.

BCC checks every call spelled ``bpf_probe_read_user`` or
``bpf_probe_read_kernel`` against all kernel symbols (with BCC 0.26, 55 ms per
call site; the capture module has 17 such calls). ``bpf_common.h`` renames
them; these checks fail when a module calls a helper before that header is
included, or includes a header that spells them out again.
"""

from __future__ import annotations

import re

import pytest

from probes.cuda import SRC_FILE as CUDA_SOURCE
from probes.sockets import COMMON, H2_SOURCE, PROBE_DIR, SOURCE, module_text

SLOW = re.compile(r"\bbpf_probe_read_(?:user|kernel)(?:_str)?\s*\(")


def _expanded(text: str) -> str:
    """``text`` with the probes' own quoted includes inlined (BCC's system headers left out)."""
    def inline(m: re.Match[str]) -> str:
        return _expanded((PROBE_DIR / m.group(1)).read_text())

    return re.sub(r'^#include "([^"]+)"', inline, text, flags=re.MULTILINE)


def _calls_before_rename(text: str) -> list[str]:
    code = _expanded(text)
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.DOTALL)
    code = re.sub(r"//[^\n]*", "", code)
    rename = code.find("#define bpf_probe_read_user read_user")
    assert rename >= 0, "bpf_common.h's renaming is not in the module"
    assert "#define bpf_probe_read_kernel read_kernel" in code
    return [m.group(0) for m in SLOW.finditer(code, 0, rename)]


@pytest.mark.parametrize("source", [SOURCE, H2_SOURCE], ids=lambda p: p.name)
def test_socket_modules_call_helpers_only_after_the_rename(source):
    text = module_text(source, 1)
    assert SLOW.search(text), "the module no longer calls the helpers: this test checks nothing"
    assert _calls_before_rename(text) == []


def test_cuda_module_calls_helpers_only_after_the_rename():
    text = CUDA_SOURCE.read_text()
    assert SLOW.search(text)
    assert _calls_before_rename(text) == []


def test_the_check_finds_a_call_placed_before_the_rename():
    text = "u64 v; bpf_probe_read_user(&v, 8, p);\n" + COMMON.read_text()
    assert _calls_before_rename(text) == ["bpf_probe_read_user("]
