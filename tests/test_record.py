"""``Request``: the record's copy with more attributes keeps everything else, and stays immutable."""

from __future__ import annotations

import ast

import pytest

from agent import native
from agent.record import REQUEST_FIELDS, Request, new_ids


def _init_params() -> dict[str, str]:
    """The constructor's parameters and their annotations, read from the source (a compiled
    class has no signature to inspect)."""
    tree = ast.parse((native.ROOT / "agent" / "record.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Request")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg: ast.unparse(a.annotation) for a in init.args.args[1:] if a.annotation is not None}


def _full() -> Request:
    # every field away from its default, so that a field the copy skipped would show
    values: dict[str, object] = {}
    params = _init_params()
    for i, name in enumerate(REQUEST_FIELDS):
        t = params[name]
        if name == "attributes":
            values[name] = {"k8s.pod.name": "vllm-0"}
        elif t in ("int", "int | None"):
            values[name] = 1000 + i
        elif t in ("float | None",):
            values[name] = 0.5 + i
        elif t == "bool":
            values[name] = True
        elif t.startswith("tuple"):
            values[name] = ("stop",) if "str" in t else (1, 2, 3)
        else:
            values[name] = f"v{i}"
    return Request(**values)  # type: ignore[arg-type]


def test_the_constructor_takes_every_field_in_order() -> None:
    assert tuple(_init_params()) == REQUEST_FIELDS


def test_with_attributes_copies_every_field_and_merges_attributes() -> None:
    r = _full()
    for f in REQUEST_FIELDS:
        assert getattr(r, f) != getattr(Request(0, 0, 0, "", None, None, None), f), f
    n = r.with_attributes({"gpu.uuid": "GPU-1", "k8s.pod.name": "vllm-1"})
    assert n is not r
    assert n == r.replace(attributes=n.attributes)
    assert dict(n.attributes) == {"k8s.pod.name": "vllm-1", "gpu.uuid": "GPU-1"}
    assert dict(r.attributes) == {"k8s.pod.name": "vllm-0"}  # the original is untouched
    assert n.to_json() == r.replace(attributes=n.attributes).to_json()
    assert n != r and r == _full()


def test_replace_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field 'bogus'"):
        _full().replace(bogus=1)


def test_the_copy_is_immutable_and_its_attributes_read_only() -> None:
    n = _full().with_attributes({"a": 1})
    if native.status().get("agent/record.py") == "compiled":
        with pytest.raises(AttributeError):
            n.pid = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        n.attributes["a"] = 2  # type: ignore[index]


def test_new_ids_are_random_hex_of_w3c_lengths() -> None:
    ids = [new_ids() for _ in range(2000)]
    for trace, span in ids:
        assert len(trace) == 32 and len(span) == 16
        int(trace, 16), int(span, 16)  # hex, or ValueError
        assert trace == trace.lower() and span == span.lower()
    assert len({t for t, _ in ids}) == len(ids) and len({s for _, s in ids}) == len(ids)
    # the two come from different bits of the draw
    assert all(t[-16:] != s for t, s in ids)


def test_new_ids_are_never_all_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    monkeypatch.setattr(random, "getrandbits", lambda k: 0)
    assert new_ids() == ("0" * 31 + "1", "0" * 15 + "1")
    monkeypatch.setattr(random, "getrandbits", lambda k: 1 << (k - 1))
    trace, span = new_ids()
    assert trace == "8" + "0" * 31 and span == "0" * 15 + "1"

