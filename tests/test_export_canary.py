"""No prompt or completion text leaves the agent through an exporter.

The parsers never put bodies into records; these tests prove the exporters
would not pass one on either. A canary string is placed everywhere content
could reach a record (a query string, every content-carrying semconv attribute
a later stage might add by mistake), the record goes through every exporter
(OTLP/gRPC spans and metrics, the Prometheus exposition in both formats, the
JSONL sink), and :func:`assert_no_canary` searches every byte that came out.

``make_request`` and ``assert_no_canary`` are imported by the other export
tests and, later, by the end-to-end canary test through real traffic.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.export import Sink
from agent.export.exporters import ExportConfig, Exporters
from agent.export.jsonl import JsonlSink
from agent.export.routes import BODY_ATTRIBUTE_PREFIXES
from agent.record import Request
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import GrpcReceiver, free_port

CANARY = "CANARY-7f3a9c-prompt-text"


def make_request(**overrides: Any) -> Request:
    """A plausible streamed chat completion served by vLLM; any field may be overridden."""
    end = overrides.pop("end_time_unix_nano", time.time_ns())
    duration_ns = int(overrides.pop("duration_s", 2.0) * 1e9)
    fields: dict[str, Any] = dict(
        start_time_unix_nano=end - duration_ns,
        end_time_unix_nano=end,
        pid=4242,
        command="vllm",
        method="POST",
        path="/v1/chat/completions",
        status_code=200,
        server_port=8000,
        client_address="10.0.0.7",
        client_port=51234,
        streaming=True,
        output_events=31,
        time_to_first_token_s=0.25,
        time_per_output_token_s=0.02,
        operation="chat",
        request_model="meta-llama/Llama-3.1-8B-Instruct",
        response_model="meta-llama/Llama-3.1-8B-Instruct",
        input_tokens=42,
        output_tokens=30,
        finish_reasons=("stop",),
        first_token_time_unix_nano=end - duration_ns + 250_000_000,
    )
    fields.update(overrides)
    return Request(**fields)


def assert_no_canary(payloads: Iterable[bytes | str], canary: str) -> None:
    """Fail if ``canary`` occurs in any payload, raw or as it would be encoded on the wire.

    Payloads are searched as bytes for the UTF-8 text, the UTF-16 forms and the
    JSON-escaped form, so that a protobuf string field, an exposition label
    value and a JSON line are all covered.
    """
    needles = {
        canary.encode(),
        canary.encode("utf-16-le"),
        canary.encode("utf-16-be"),
        canary.encode("unicode_escape"),
    }
    count = 0
    for i, p in enumerate(payloads):
        data = p.encode() if isinstance(p, str) else bytes(p)
        count += 1
        for needle in needles:
            assert needle not in data, f"canary found in payload {i}: ...{_around(data, needle)!r}..."
    assert count, "no payloads to check: the test would prove nothing"


def _around(data: bytes, needle: bytes) -> bytes:
    at = data.find(needle)
    return data[max(0, at - 60) : at + len(needle) + 60]


def scrape(port: int, openmetrics: bool) -> bytes:
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def canary_records() -> list[Request]:
    content = {
        key + ".content" if key.endswith("body") else key: f"{CANARY}" for key in BODY_ATTRIBUTE_PREFIXES
    }
    return [
        make_request(path=f"/v1/completions?prompt={CANARY}&x=1", operation="text_completion"),
        make_request(path=f"/v1/chat/completions#{CANARY}"),
        make_request().with_attributes({**content, "k8s.pod.name": "vllm-0", "k8s.namespace.name": "llm"}),
        make_request(
            method="GET", path=f"/v1/models?{CANARY}", status_code=503, operation=None, request_model=None
        ),
    ]


def export_everything(records: list[Request], tmp_path: Path) -> list[bytes]:
    """Every byte each exporter produced for ``records``."""
    metrics = SelfMetrics()
    port = free_port()
    out = tmp_path / "records.jsonl"
    with GrpcReceiver() as rx:
        ex: Sink = Exporters(
            ExportConfig(
                otlp_endpoint=f"http://127.0.0.1:{rx.port}",
                prometheus_port=port,
                prometheus_host="127.0.0.1",
                otlp_metrics_interval_s=3600,
            ),
            metrics=metrics,
        )
        sink = JsonlSink(str(out), metrics=metrics)
        try:
            for r in records:
                ex.emit(r)
                sink.emit(r)
            ex.flush()
            assert rx.wait(lambda c: len(c.spans()) >= len(records) and bool(c.metric_requests), 20)
            payloads = [scrape(port, openmetrics=True), scrape(port, openmetrics=False)]
        finally:
            ex.shutdown()
            sink.shutdown()
        payloads += [r.SerializeToString() for r in rx.trace_requests]
        payloads += [r.SerializeToString() for r in rx.metric_requests]
    payloads.append(out.read_bytes())
    return payloads


def test_exporters_never_carry_content(tmp_path: Path) -> None:
    payloads = export_everything(canary_records(), tmp_path)
    assert_no_canary(payloads, CANARY)
    # The metadata did go out: the check ran on real exports, not on empty ones.
    joined = b"".join(payloads)
    assert (
        b"/v1/completions" in joined
        and b"vllm-0" in joined
        and b"gen_ai_server_time_to_first_token" in joined
    )


def test_canary_check_sees_a_leak_in_every_payload_form(tmp_path: Path) -> None:
    # Positive control: a canary in a field that *is* exported (the model name)
    # must be found in the protobuf, the exposition and the JSON line.
    leaky = [make_request(request_model=f"model-{CANARY}")]
    payloads = export_everything(leaky, tmp_path)
    for p in payloads:
        with pytest.raises(AssertionError, match="canary found"):
            assert_no_canary([p], CANARY)


def test_json_escaped_and_utf16_canaries_are_found() -> None:
    with pytest.raises(AssertionError):
        assert_no_canary([CANARY.encode("utf-16-le")], CANARY)
    with pytest.raises(AssertionError):
        assert_no_canary(["x" + CANARY + "y"], CANARY)
    with pytest.raises(AssertionError, match="no payloads"):
        assert_no_canary([], CANARY)
