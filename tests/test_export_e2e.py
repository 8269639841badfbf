"""Export end to end: the real agent (``infersight run``) traces a real server
under real traffic; a real Prometheus scrapes it, a real OTLP receiver gets
its spans. A canary prompt sent through that traffic appears nowhere: not in
OTLP payloads, not in /metrics (either format), not in JSONL, not in logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from agent.export.instruments import TTFT_BUCKETS
from tests.harness import REPO, free_port, start_demo_server, wait_for
from tests.otlp_receiver import GrpcReceiver
from tests.test_export_canary import assert_no_canary
from tests.test_export_prometheus import PrometheusServer, prometheus_binary

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

CANARY = "CANARY-e2e-4d1f-do-not-export"
# TTFT schedule, each value in the middle of a bucket: 12 at 30 ms, 6 at 150 ms, 2 at 600 ms
SCHEDULE = [(0.03, 12), (0.15, 6), (0.6, 2)]


def _scrape(port: int, openmetrics: bool) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if openmetrics:
        req.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(req, timeout=5) as r:
        return str(r.read().decode())


def test_real_traffic_reaches_prometheus_and_otlp_without_prompt_text(tmp_path: Path) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs it)")
    srv = start_demo_server(tmp_path)
    # the server's first requests, before the agent attaches: a fresh uvicorn app answers its
    # first few streams 10-20 ms late, which would move the schedule's TTFTs out of their buckets
    warm = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: list(warm.chat.completions.create(
            model="warm-up", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=2,
            extra_body={"ttft_s": 0.01, "tpot_s": 0.001})), range(8)))
    rx = GrpcReceiver().start()
    prom_port = free_port()
    jsonl = tmp_path / "records.jsonl"
    log = tmp_path / "agent.log"
    logf = open(log, "w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--pid", str(srv.pid), "--jsonl", str(jsonl),
         "--prometheus-port", str(prom_port), "--prometheus-host", "127.0.0.1",
         "--otlp-endpoint", f"http://127.0.0.1:{rx.port}", "--log-level", "debug"],
        cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(REPO), OTEL_SERVICE_NAME="infersight-e2e", NODE_NAME="node-e2e"),
    )
    prom = None
    try:
        wait_for(lambda: "attached to 1 target" in log.read_text(), 60, what="agent attached")
        # and HTTP/2 capture compiled (in the background, after the attach): the
        # TTFT schedule below is timed against an otherwise quiet agent
        wait_for(lambda: "HTTP/2 capture ready" in log.read_text(), 60, what="HTTP/2 capture loaded")
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{prom_port}"])
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

        def one(ttft: float) -> None:
            chunks = client.chat.completions.create(
                model="llama-e2e", messages=[{"role": "user", "content": f"{CANARY} please"}], stream=True,
                max_tokens=4, stream_options={"include_usage": True}, extra_body={"ttft_s": ttft, "tpot_s": 0.002},
            )
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4

        ttfts = [t for t, n in SCHEDULE for _ in range(n)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, ttfts))
        n = len(ttfts)
        wait_for(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= n, 15)

        # Prometheus: TTFT quantiles fall in the buckets of the schedule
        prom.wait_for("sum(gen_ai_server_time_to_first_token_seconds_count)",
                      lambda r: bool(r) and r[0]["value"][1] == str(n))
        bounds = (0.0, *TTFT_BUCKETS)

        def bucket_of(v: float) -> tuple[float, float]:
            i = next(i for i, b in enumerate(TTFT_BUCKETS) if v <= b)
            return bounds[i], TTFT_BUCKETS[i]

        for q, true in [(0.25, 0.03), (0.5, 0.03), (0.75, 0.15), (0.95, 0.6)]:
            res = prom.query(f"histogram_quantile({q}, sum by (le) (gen_ai_server_time_to_first_token_seconds_bucket))")
            got = float(res[0]["value"][1])
            lo, hi = bucket_of(true)
            assert lo <= got <= hi, (q, got, (lo, hi))
        by_model = prom.query('sum(http_server_request_duration_seconds_count{http_route="/v1/chat/completions"})')
        assert by_model[0]["value"][1] == str(n)

        # OpenMetrics exposition: exemplars carry trace ids of spans the receiver got
        om = _scrape(prom_port, True)
        exemplar_ids = set(re.findall(r'# \{[^}]*trace_id="([0-9a-f]{32})"', om))
        assert exemplar_ids
        assert rx.wait(lambda c: len([s for _, s in c.spans() if s.name == "POST /v1/chat/completions"]) >= n, 30)
        spans = [(res, s) for res, s in rx.spans() if s.name == "POST /v1/chat/completions"]
        assert len(spans) == n
        span_ids = {s.trace_id.hex() for _, s in spans}
        assert exemplar_ids <= span_ids
        resource = spans[0][0]
        assert resource["service.name"] == "infersight-e2e" and resource["k8s.node.name"] == "node-e2e"

        # every request accounted: records, spans, and the agent's own counters agree
        rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
        assert len(rows) == n and all(r["gen_ai.request.model"] == "llama-e2e" for r in rows)
        text = _scrape(prom_port, False)
        emitted = float(re.search(r"^infersight_records_emitted_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        assert emitted == n
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        logf.close()
        if prom is not None:
            prom.stop()
        srv.stop()
    assert code == 0
    # the canary: nowhere
    payloads: list[bytes | str] = [r.SerializeToString() for r in rx.trace_requests]
    payloads += [r.SerializeToString() for r in rx.metric_requests]
    payloads += [om, text, jsonl.read_text(), log.read_text()]
    rx.stop()
    assert_no_canary(payloads, CANARY)
    assert "please" not in log.read_text()
