"""The base of the small immutable values made per request.

The HTTP/1 and SSE events, NDJSON lines and what an LLM body says are built
several times per request. As frozen dataclasses each would cost an
``object.__setattr__`` call per field in ``__init__``; as plain classes with
``Final`` fields, compiled with mypyc (``agent.native``), they are built with a
few stores, and assigning a field raises. :class:`Value` gives them equality
and a repr by value (what the tests compare), from the fields each subclass
lists in ``_key``. Values are not hashable, like a frozen dataclass holding a
list.
"""

from __future__ import annotations


class Value:
    __slots__ = ()

    def _key(self) -> tuple[object, ...]:
        """The fields, in the constructor's order."""
        return ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._key()!r}"
