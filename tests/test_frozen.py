"""``agent.frozen.copier``: the same object ``dataclasses.replace`` gives, for the classes it accepts."""

from __future__ import annotations

import dataclasses

import pytest

from agent.frozen import copier
from agent.http2 import H2Stream


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


def test_copy_equals_replace_and_stays_frozen() -> None:
    copy = copier(Point)
    p = Point(1, 2, ("a",))
    q = copy(p, y=5)
    assert q == dataclasses.replace(p, y=5) == Point(1, 5, ("a",))
    assert p == Point(1, 2, ("a",))  # the original is untouched
    assert copy(p) == p and copy(p) is not p
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.x = 3  # type: ignore[misc]
    with pytest.raises(KeyError):
        copy(p, z=1)


def test_h2_stream_copy_equals_replace() -> None:
    values = {f.name: None for f in dataclasses.fields(H2Stream) if f.default is dataclasses.MISSING}
    values.update(stream_id=3, method="POST", end_reason="end_stream", request_messages=1, response_messages=1,
                  request_bytes=10, response_bytes=20, headers_lost=False, messages_lost=False)
    s = H2Stream(**values, request_message=b"llama")  # type: ignore[arg-type]
    changes = {"request_messages": 2, "response_messages": 7, "messages_lost": True}
    assert copier(H2Stream)(s, **changes) == dataclasses.replace(s, **changes)


def test_refuses_classes_it_would_copy_wrongly() -> None:
    @dataclasses.dataclass(slots=True)
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        x: int

        def __post_init__(self) -> None:
            pass

    for cls in (Mutable, NoSlots, PostInit):
        with pytest.raises(TypeError):
            copier(cls)
