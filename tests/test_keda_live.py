"""KEDA's queries against a real Prometheus scraping a real agent.

A real server runs in a kubelet-style cgroup; the fake API server serves its
pod, owned (through a ReplicaSet) by the Deployment ``serving/llm-demo``;
``infersight run`` traces it and decorates requests with the pod's metadata.
The chart's ScaledObject for that Deployment is rendered with real Helm, and
its queries are evaluated by a real Prometheus while a known number of
streaming requests are in flight: the in-flight query must return exactly
that number, and every query must evaluate.

Then the same for a deployment that serves only gRPC (Triton / KServe v2): the
KServe v2 test server in its own pod, driven by ``tritonclient``. The agent
counts its calls in ``rpc.server.duration`` only (no HTTP series, no in-flight
gauge), and the chart's queries must still answer: the request rate of its
calls, and 0, not nothing, for the in-flight and TTFT triggers.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import helm_python
import httpx
import pytest
import yaml

from tests.fakes.fake_apiserver import FakeApiServer, make_pod, make_replicaset
from tests.harness import REPO, free_port, wait_for
from tests.join_support import NODE, new_cid, new_uid, systemd_path
from tests.test_export_prometheus import PrometheusServer, prometheus_binary
from tests.test_grpc_e2e import KServe
from tests.test_join_e2e import UNIFIED, PodServer, _cgroup2_writable, api, server, tmp_module  # noqa: F401

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

CHART = REPO / "helm" / "infersight"
IN_FLIGHT = 3


def scaled_object_queries(prom_url: str, target: dict[str, Any] | None = None) -> dict[str, str]:
    """Trigger name -> query of the chart's one ScaledObject for ``target`` (default: llm-demo)."""
    target = target or {"namespace": "serving", "deployment": "llm-demo"}
    values = {"keda": {"enabled": True, "prometheusServerAddress": prom_url, "targets": [target]}}
    rendered = helm_python.Chart.load(CHART).render(values, name="infersight", namespace="infersight")
    out: dict[str, str] = {}
    for path, text in rendered.items():
        for doc in yaml.safe_load_all(text) if path.endswith(".yaml") else ():
            if doc and doc.get("kind") == "ScaledObject":
                for trig in doc["spec"]["triggers"]:
                    out[trig["name"]] = trig["metadata"]["query"]
    return out


@contextmanager
def running_agent(pid: int, api_url: str, log: Path) -> Iterator[int]:
    """``infersight run --pid`` on loopback, with the fake API server; yields its metrics port."""
    port = free_port()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--pid", str(pid), "--prometheus-port", str(port),
             "--prometheus-host", "127.0.0.1", "--kube-api-url", api_url, "--no-gpu"],
            cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO), NODE_NAME=NODE),
        )  # fmt: skip
    try:
        wait_for(lambda: "attached to 1 target" in log.read_text(), 60, what="agent attached")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture
def agent(server: PodServer, api: FakeApiServer, tmp_path: Path) -> Iterator[tuple[int, Path]]:  # noqa: F811
    log = tmp_path / "agent.log"
    with running_agent(server.pid, api.url, log) as port:
        yield port, log


def test_keda_queries_against_a_live_agent(
    server: PodServer,  # noqa: F811
    agent: tuple[int, Path],
    tmp_path: Path,
) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs it)")
    port, log = agent
    prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
    stop = threading.Event()
    started = threading.Semaphore(0)

    def slow_stream() -> None:
        body = {
            "model": "keda-model",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 400,
            "ttft_s": 0.05,
            "tpot_s": 0.05,
        }
        with (
            httpx.Client(base_url=server.url, timeout=60) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            started.release()
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    try:
        queries = scaled_object_queries(f"http://127.0.0.1:{prom.port}")
        assert set(queries) == {"active-requests", "ttft-p90"}
        # a finished request first, so that the deployment's series exist and the TTFT query has data
        with httpx.Client(base_url=server.url, timeout=30) as c:
            c.post(
                "/v1/chat/completions",
                json={
                    "model": "keda-model",
                    "messages": [],
                    "stream": True,
                    "max_tokens": 3,
                    "ttft_s": 0.01,
                    "tpot_s": 0.001,
                },
            ).read()
        try:
            prom.wait_for(
                'sum(http_server_request_duration_seconds_count{k8s_deployment_name="llm-demo"})',
                lambda r: bool(r) and float(r[0]["value"][1]) >= 1,
                timeout=60,
            )
        except AssertionError:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            raise AssertionError(
                "agent exposition:\n"
                + "\n".join(
                    line
                    for line in text.splitlines()
                    if "request_duration_seconds_count" in line or "collector_up" in line or "join" in line
                )
            ) from None
        idle = prom.query(queries["active-requests"])
        assert idle and float(idle[0]["value"][1]) == 0.0, idle
        threads = [threading.Thread(target=slow_stream, daemon=True) for _ in range(IN_FLIGHT)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)

        def in_flight() -> list[dict[str, Any]]:
            return prom.query(queries["active-requests"])

        got = wait_for(
            lambda: (r := in_flight()) and float(r[0]["value"][1]) == IN_FLIGHT and r,
            40,
            what=f"in-flight = {IN_FLIGHT}",
        )
        assert float(got[0]["value"][1]) == IN_FLIGHT
        stop.set()
        # finished requests spread over a few scrapes give rate() something to see
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(8):
                c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "keda-model",
                        "messages": [],
                        "stream": True,
                        "max_tokens": 2,
                        "ttft_s": 0.3,
                        "tpot_s": 0.001,
                    },
                ).read()
                stop.wait(0.5)
        ttft = prom.wait_for(
            queries["ttft-p90"], lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=40
        )
        assert 0.25 <= float(ttft[0]["value"][1]) <= 0.5  # the p90 falls in the bucket holding 300 ms
    finally:
        stop.set()
        prom.stop()
    assert "Traceback" not in log.read_text()


# --------------------------------------------------------------------------- a gRPC-only deployment

GRPC_NS, GRPC_DEPLOYMENT = "vision", "triton-grpc"
GRPC_CALLS = 12


@contextmanager
def kserve_pod(tmp: Path) -> Iterator[tuple[KServe, FakeApiServer]]:
    """The KServe v2 gRPC test server in a kubelet-named cgroup, and a fake API server that serves
    its pod, owned through a ReplicaSet by the Deployment ``vision/triton-grpc``."""
    reason = _cgroup2_writable()
    if reason:
        pytest.skip(reason)
    uid, cid = new_uid(), new_cid()
    leaf = UNIFIED / f"infersight-keda-{secrets.token_hex(4)}.slice" / systemd_path(uid, cid).lstrip("/")
    created = [d for d in reversed([leaf, *leaf.parents]) if UNIFIED in d.parents and not d.exists()]
    for d in created:
        d.mkdir()
    kserve = KServe(tmp)
    fake = FakeApiServer()
    try:
        # cgroup.procs moves every thread of the process; the agent reads the cgroup when it attaches.
        (leaf / "cgroup.procs").write_text(f"{kserve.pid}\n")
        rs = f"{GRPC_DEPLOYMENT}-7c9d5f"
        fake.put_replicaset(
            make_replicaset(rs, namespace=GRPC_NS, deployment=GRPC_DEPLOYMENT, template_hash="7c9d5f")
        )
        fake.put_pod(make_pod(f"{rs}-q8w2z", namespace=GRPC_NS, node=NODE, uid=uid, containers={"triton": cid},
                              owner=("apps/v1", "ReplicaSet", rs), labels={"pod-template-hash": "7c9d5f"}))  # fmt: skip
        fake.start()
        yield kserve, fake
    finally:
        fake.stop()
        kserve.stop()
        for d in reversed(created):
            d.rmdir()


def query_at(prom: PrometheusServer, promql: str, at: str) -> list[dict[str, Any]]:
    """An instant query at a fixed time: rate() extrapolates to the end of its window, so queries
    compared with each other must share it."""
    url = f"http://127.0.0.1:{prom.port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql, "time": at}
    )
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_keda_queries_for_a_grpc_only_deployment(tmp_path: Path) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs it)")
    log = tmp_path / "agent.log"
    sel = f'k8s_namespace_name="{GRPC_NS}",k8s_deployment_name="{GRPC_DEPLOYMENT}"'
    with kserve_pod(tmp_path) as (kserve, fake), running_agent(kserve.pid, fake.url, log) as port:
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
        try:
            # Defaults (in-flight and TTFT triggers) plus the request-rate trigger.
            queries = scaled_object_queries(
                f"http://127.0.0.1:{prom.port}",
                {"namespace": GRPC_NS, "deployment": GRPC_DEPLOYMENT, "requestsPerSecondPerReplica": 50},
            )
            assert set(queries) == {"active-requests", "request-rate", "ttft-p90"}
            # The client connects once the agent's HTTP/2 capture is loaded (it loads after the attach):
            # the connection is then walked from its preface, HPACK tables included.
            wait_for(lambda: "HTTP/2 capture ready" in log.read_text(), 60, what="HTTP/2 capture")
            kserve.connect()
            assert kserve.call(op="infer", model="simple", id="first") == {"shape": [1, 16]}
            count = f"sum(rpc_server_duration_milliseconds_count{{{sel}}})"
            try:
                prom.wait_for(count, lambda r: bool(r) and float(r[0]["value"][1]) == 1, timeout=60)
            except AssertionError:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                raise AssertionError(
                    "agent exposition:\n"
                    + "\n".join(line for line in text.splitlines() if "_count" in line or "k8s" in line)
                    + "\nagent log:\n"
                    + log.read_text()[-3000:]
                ) from None
            # rate() needs two samples of the counter.
            prom.wait_for(queries["request-rate"], bool, timeout=10)
            # Before the load: the deployment is known and idle, so every trigger reads 0, not nothing.
            for name in ("active-requests", "request-rate", "ttft-p90"):
                idle = prom.query(queries[name])
                assert idle and float(idle[0]["value"][1]) == 0.0, (name, idle)
            # Calls spread over several scrapes, so that rate() sees them arrive.
            for i in range(GRPC_CALLS):
                assert kserve.call(op="infer", model="simple", id=f"c{i}", delay_ms=5) == {"shape": [1, 16]}
                time.sleep(0.4)
            prom.wait_for(count, lambda r: bool(r) and float(r[0]["value"][1]) == 1 + GRPC_CALLS, timeout=30)
            at = f"{time.time():.3f}"

            def value(promql: str) -> float:
                (r,) = query_at(prom, promql, at)
                return float(r["value"][1])

            # Every call was counted once, as a gRPC call and never as an HTTP request.
            assert not query_at(prom, f"http_server_request_duration_seconds_count{{{sel}}}", at)
            calls = query_at(prom, f"sum by (rpc_method, rpc_grpc_status_code) (rpc_server_duration_milliseconds_count{{{sel}}})", at)  # fmt: skip
            assert [(r["metric"], r["value"][1]) for r in calls] == [
                ({"rpc_method": "ModelInfer", "rpc_grpc_status_code": "0"}, str(1 + GRPC_CALLS))
            ]
            rate = value(queries["request-rate"])
            assert rate == pytest.approx(
                value(f"sum(rate(rpc_server_duration_milliseconds_count{{{sel}}}[2m]))")
            )
            # rate() over 2m is the increase between the first and last samples (GRPC_CALLS: the first
            # call was already in the first sample), extrapolated outward by at most about a scrape
            # interval at each end, over 120 s.
            assert GRPC_CALLS <= rate * 120 <= 1.25 * (GRPC_CALLS + 1), rate
            # No in-flight gauge and no first token for unary calls: 0, not nothing.
            assert value(queries["active-requests"]) == 0.0
            assert value(queries["ttft-p90"]) == 0.0
        finally:
            prom.stop()
    assert "Traceback" not in log.read_text()
