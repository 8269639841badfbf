"""``Request``: the record's copy with more attributes keeps everything else, and stays frozen."""

from __future__ import annotations

import dataclasses

import pytest

from agent.record import Request


def _full() -> Request:
    # every field away from its default, so that a field the copy skipped would show
    values: dict[str, object] = {}
    for i, f in enumerate(dataclasses.fields(Request)):
        if f.name == "attributes":
            values[f.name] = {"k8s.pod.name": "vllm-0"}
        elif f.type in ("int", "int | None"):
            values[f.name] = 1000 + i
        elif f.type in ("float | None",):
            values[f.name] = 0.5 + i
        elif f.type == "bool":
            values[f.name] = True
        elif f.type.startswith("tuple"):
            values[f.name] = ("stop",) if "str" in f.type else (1, 2, 3)
        else:
            values[f.name] = f"v{i}"
    return Request(**values)  # type: ignore[arg-type]


def test_with_attributes_copies_every_field_and_merges_attributes() -> None:
    r = _full()
    for f in dataclasses.fields(Request):
        assert getattr(r, f.name) != getattr(Request(0, 0, 0, "", None, None, None), f.name), f.name
    n = r.with_attributes({"gpu.uuid": "GPU-1", "k8s.pod.name": "vllm-1"})
    assert n is not r
    assert n == dataclasses.replace(r, attributes=n.attributes)
    assert dict(n.attributes) == {"k8s.pod.name": "vllm-1", "gpu.uuid": "GPU-1"}
    assert dict(r.attributes) == {"k8s.pod.name": "vllm-0"}  # the original is untouched
    assert n.to_json() == dataclasses.replace(r, attributes=n.attributes).to_json()


def test_the_copy_is_frozen_and_its_attributes_read_only() -> None:
    n = _full().with_attributes({"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.pid = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        n.attributes["a"] = 2  # type: ignore[index]
