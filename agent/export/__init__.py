"""Exporters: they read :class:`agent.record.Request` records and never change them."""

from __future__ import annotations

from typing import Protocol

from agent.record import Request


class Sink(Protocol):
    """Where completed records go. ``emit`` is called from the pipeline's
    assembly thread and must not block on I/O: a sink that exports over the
    network queues (bounded, with counted drops) and sends from its own thread.
    """

    def emit(self, record: Request) -> None: ...

    def flush(self) -> None: ...

    def shutdown(self) -> None: ...
