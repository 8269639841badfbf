"""``JsonlSink``: one ``Request.to_json()`` line per record, flushed at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.export import Sink
from agent.export.jsonl import JsonlSink
from agent.record import RECORD_KEYS
from agent.selfmetrics import SelfMetrics
from tests.test_export_canary import make_request


def test_lines_are_records_and_visible_before_shutdown(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    m = SelfMetrics()
    sink: Sink = JsonlSink(str(out), metrics=m)  # the pipeline's Sink protocol (checked by mypy)
    a = make_request().with_attributes({"k8s.pod.name": "vllm-0"})
    b = make_request(status_code=500, error_type="response_incomplete")
    sink.emit(a)
    # Flushed per line: a reader sees the record before the sink is closed.
    assert out.read_text() == a.to_json() + "\n"
    sink.emit(b)
    sink.shutdown()
    lines = out.read_text().splitlines()
    assert lines == [a.to_json(), b.to_json()]
    for line in lines:
        assert set(RECORD_KEYS) <= set(json.loads(line))
    assert json.loads(lines[0])["k8s.pod.name"] == "vllm-0"
    assert m.get("infersight.export.jsonl.records") == 2


def test_content_attributes_and_queries_are_cut(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    m = SelfMetrics()
    sink = JsonlSink(str(out), metrics=m)
    sink.emit(make_request(path="/v1/completions?prompt=hello").with_attributes({"gen_ai.prompt": "hello"}))
    sink.shutdown()
    d = json.loads(out.read_text())
    assert d["url.path"] == "/v1/completions" and "gen_ai.prompt" not in d
    assert m.get("infersight.export.attributes.refused", (("attribute", "gen_ai.prompt"),)) == 1


def test_stdout_dash() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from agent.export.jsonl import JsonlSink\n"
        "from tests.test_export_canary import make_request\n"
        "s = JsonlSink('-'); s.emit(make_request(pid=77)); s.shutdown()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(res.stdout)["process.pid"] == 77


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    m = SelfMetrics()
    sink = JsonlSink("/dev/full", metrics=m)
    sink.emit(make_request())
    sink.emit(make_request())
    sink.flush()
    sink.shutdown()
    assert m.get("infersight.export.jsonl.errors", (("reason", "write"),)) == 1
    assert m.get("infersight.export.jsonl.errors", (("reason", "closed"),)) == 1
