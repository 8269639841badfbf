"""``Request``: the record's copy with more attributes keeps everything else, and stays immutable."""

from __future__ import annotations

import ast

import pytest

from agent import native
from agent.record import REQUEST_FIELDS, Request, SpanIds, new_ids


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
    del params["ids"]
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
    # then, optionally, the holder of the two ids in place of trace_id and span_id
    assert tuple(_init_params()) == (*REQUEST_FIELDS, "ids")


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


def _lazy(ids: SpanIds) -> Request:
    return Request(0, 0, 1, "x", "GET", "/", 200, ids=ids)


def test_ids_not_drawn_are_drawn_when_first_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    r = _lazy(SpanIds(drawn=False))
    # drawn now, at the first read, not when the record was made
    monkeypatch.setattr(random, "getrandbits", lambda k: (0xABC << 64) | 0xDEF)
    assert r.span_id == "0" * 13 + "def"
    assert r.trace_id == "0" * 29 + "abc"
    monkeypatch.undo()
    assert (r.trace_id, r.span_id) == ("0" * 29 + "abc", "0" * 13 + "def")  # and kept
    assert r.to_dict()["trace_id"] == r.trace_id and r.to_dict()["span_id"] == r.span_id


def test_a_given_trace_id_is_kept_and_only_the_span_id_drawn() -> None:
    r = _lazy(SpanIds("4bf92f3577b34da6a3ce929d0e0e4736", drawn=False))
    assert r.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len(r.span_id or "") == 16 and int(r.span_id or "", 16)


def test_copies_share_the_ids_drawn_after_the_copy() -> None:
    r = _lazy(SpanIds(drawn=False))
    n = r.with_attributes({"k8s.pod.name": "vllm-0"})
    assert (n.trace_id, n.span_id) == (r.trace_id, r.span_id)
    assert n.trace_id is not None and n.span_id is not None
    # two records of their own draw their own
    assert _lazy(SpanIds(drawn=False)).span_id != r.span_id


def test_ids_given_are_what_was_given_none_included() -> None:
    assert (Request(0, 0, 1, "x", None, None, None).trace_id, Request(0, 0, 1, "x", None, None, None).span_id) \
        == (None, None)
    r = Request(0, 0, 1, "x", None, None, None, trace_id="a" * 32, span_id="b" * 16)
    assert (r.trace_id, r.span_id) == ("a" * 32, "b" * 16)
    assert _lazy(SpanIds("c" * 32, "d" * 16)).span_id == "d" * 16
