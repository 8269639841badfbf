"""``JsonlSink``: one JSON line per record (``infersight run --jsonl PATH|-``).

Each line is :meth:`Request.to_json` and is flushed at once, so a reader
following the file (or the pipe) sees a request as soon as it ends. A write
error (disk full, closed pipe) is counted in ``infersight.export.jsonl.errors``,
logged once, and turns the sink off; the agent runs on.

Thread-safe: a lock serialises writes.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import IO

from agent.export.routes import REFUSED, is_body_attribute, strip_query
from agent.record import Request
from agent.selfmetrics import SELF_METRICS, SelfMetrics

log = logging.getLogger(__name__)

ERRORS = "infersight.export.jsonl.errors"
WRITTEN = "infersight.export.jsonl.records"


class JsonlSink:
    """Writes records to ``path``, or to standard output when ``path`` is ``"-"``.

    Opening the file may raise OSError (the caller decides whether that is fatal);
    ``emit`` never raises.
    """

    def __init__(self, path: str, metrics: SelfMetrics = SELF_METRICS) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._owned = path != "-"
        self._out: IO[str] | None = open(path, "a", encoding="utf-8") if self._owned else sys.stdout
        metrics.describe(ERRORS, "counter", "JSONL write failures (the sink stops after the first)")
        metrics.describe(WRITTEN, "counter", "Records written as JSONL lines")

    def emit(self, record: Request) -> None:
        line = self._line(record) + "\n"
        with self._lock:
            if self._out is None:
                self._metrics.inc(ERRORS, labels=(("reason", "closed"),))
                return
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError) as exc:
                self._metrics.inc(ERRORS, labels=(("reason", "write"),))
                log.error("JSONL output failed, records are no longer written there: %s", exc)
                self._close()
                return
        self._metrics.inc(WRITTEN)

    def _line(self, record: Request) -> str:
        """``record.to_json()``, minus content a later stage may have put in by mistake.

        A query string is cut from ``url.path`` and content-carrying attributes
        (see ``routes.BODY_ATTRIBUTE_PREFIXES``) are left out, counted; records
        without either (all of them, normally) are written exactly as ``to_json``.
        """
        refused = [k for k in record.attributes if is_body_attribute(k)]
        if not refused and (record.path is None or not any(c in record.path for c in "?#")):
            return record.to_json()
        d = record.to_dict()
        for k in refused:
            del d[k]
            self._metrics.inc(REFUSED, labels=(("attribute", k[:64]),))
        if record.path is not None:
            d["url.path"] = strip_query(record.path)
        return json.dumps(d, separators=(",", ":"))

    def flush(self) -> None:
        with self._lock:
            if self._out is not None:
                try:
                    self._out.flush()
                except (OSError, ValueError):
                    self._metrics.inc(ERRORS, labels=(("reason", "flush"),))

    def shutdown(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        out, self._out = self._out, None
        if out is not None and self._owned:
            try:
                out.close()
            except OSError:
                pass
