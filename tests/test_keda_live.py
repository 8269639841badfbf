"""KEDA's queries against a real Prometheus scraping a real agent.

A real server runs in a kubelet-style cgroup; the fake API server serves its
pod, owned (through a ReplicaSet) by the Deployment ``serving/llm-demo``;
``infersight run`` traces it and decorates requests with the pod's metadata.
The chart's ScaledObject for that Deployment is rendered with real Helm, and
its queries are evaluated by a real Prometheus while a known number of
streaming requests are in flight: the in-flight query must return exactly
that number, and every query must evaluate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import httpx
import pytest
import yaml

from tests.fakes.fake_apiserver import FakeApiServer
from tests.harness import REPO, free_port, wait_for
from tests.join_support import NODE
from tests.test_export_prometheus import PrometheusServer, prometheus_binary
from tests.test_join_e2e import PodServer, api, server, tmp_module  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

CHART = REPO / "helm" / "infersight"
IN_FLIGHT = 3


def scaled_object_queries(prom_url: str) -> dict[str, str]:
    values = {"keda": {"enabled": True, "prometheusServerAddress": prom_url,
                       "targets": [{"namespace": "serving", "deployment": "llm-demo"}]}}
    rendered = helm_python.Chart.load(CHART).render(values, name="infersight", namespace="infersight")
    out: dict[str, str] = {}
    for path, text in rendered.items():
        for doc in yaml.safe_load_all(text) if path.endswith(".yaml") else ():
            if doc and doc.get("kind") == "ScaledObject":
                for trig in doc["spec"]["triggers"]:
                    out[trig["name"]] = trig["metadata"]["query"]
    return out


@pytest.fixture
def agent(server: PodServer, api: FakeApiServer, tmp_path: Path) -> Iterator[tuple[int, Path]]:  # noqa: F811
    port = free_port()
    log = tmp_path / "agent.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--pid", str(server.pid), "--prometheus-port", str(port),
             "--prometheus-host", "127.0.0.1", "--kube-api-url", api.url, "--no-gpu"],
            cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO), NODE_NAME=NODE),
        )
    try:
        wait_for(lambda: "attached to 1 target" in log.read_text(), 60, what="agent attached")
        yield port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_keda_queries_against_a_live_agent(server: PodServer, agent: tuple[int, Path],  # noqa: F811
                                          tmp_path: Path) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs it)")
    port, log = agent
    prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
    stop = threading.Event()
    started = threading.Semaphore(0)

    def slow_stream() -> None:
        body = {"model": "keda-model", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "max_tokens": 400, "ttft_s": 0.05, "tpot_s": 0.05}
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                        json=body) as r:
            started.release()
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    try:
        queries = scaled_object_queries(f"http://127.0.0.1:{prom.port}")
        assert set(queries) == {"active-requests", "ttft-p90"}
        # a finished request first, so that the deployment's series exist and the TTFT query has data
        with httpx.Client(base_url=server.url, timeout=30) as c:
            c.post("/v1/chat/completions", json={"model": "keda-model", "messages": [], "stream": True,
                                                 "max_tokens": 3, "ttft_s": 0.01, "tpot_s": 0.001}).read()
        try:
            prom.wait_for('sum(http_server_request_duration_seconds_count{k8s_deployment_name="llm-demo"})',
                          lambda r: bool(r) and float(r[0]["value"][1]) >= 1, timeout=60)
        except AssertionError:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            raise AssertionError("agent exposition:\n" + "\n".join(
                line for line in text.splitlines() if "request_duration_seconds_count" in line
                or "collector_up" in line or "join" in line)) from None
        idle = prom.query(queries["active-requests"])
        assert idle and float(idle[0]["value"][1]) == 0.0, idle
        threads = [threading.Thread(target=slow_stream, daemon=True) for _ in range(IN_FLIGHT)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)

        def in_flight() -> list[dict[str, Any]]:
            return prom.query(queries["active-requests"])

        got = wait_for(lambda: (r := in_flight()) and float(r[0]["value"][1]) == IN_FLIGHT and r, 40,
                       what=f"in-flight = {IN_FLIGHT}")
        assert float(got[0]["value"][1]) == IN_FLIGHT
        stop.set()
        # finished requests spread over a few scrapes give rate() something to see
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(8):
                c.post("/v1/chat/completions", json={"model": "keda-model", "messages": [], "stream": True,
                                                     "max_tokens": 2, "ttft_s": 0.3, "tpot_s": 0.001}).read()
                stop.wait(0.5)
        ttft = prom.wait_for(queries["ttft-p90"], lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=40)
        assert 0.25 <= float(ttft[0]["value"][1]) <= 0.5  # the p90 falls in the bucket holding 300 ms
    finally:
        stop.set()
        prom.stop()
    assert "Traceback" not in log.read_text()
