"""The Grafana dashboards: committed JSON is what the code builds, every query is valid PromQL
(checked by the real ``promtool``) and names only metrics and labels the agent exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.export.instruments import INSTRUMENTS
from agent.export.otlp import SPANS as OTLP_SPANS
from agent.export.routes import label_name
from agent.join import DERIVED_METRICS
from collectors.nvml import load_metric_set
from dashboards import build
from probes.cuda import CUDA_METRICS
from tests.conftest import IN_CI, REPO

PROMTOOL = shutil.which("promtool")

#: Metric names the task fixes that no table defines yet: self metrics counted by name at run time
#: (SELF_METRICS `infersight.events.lost`, `infersight.parse.failures`, a BPF map fill gauge) and
#: the per-pod GPU share. Each is a promise another part of the agent keeps; drop it from this set
#: once a table defines it.
FIXED_ELSEWHERE = {
    "infersight_events_lost_total",  # agent/pipeline.py, from the kernel's counters
    "infersight_parse_failures_total",  # the parsers
    "infersight_bpf_map_fill_ratio",  # agent/pipeline.py
    "infersight_requests_lost_total",  # agent/pipeline.py, from the kernel's counters, and assembly
    "infersight_bpf_map_evictions_total",  # agent/pipeline.py
    "infersight_kernel_tail_rings_reclaimed_total",  # agent/pipeline.py, from the kernel's counters
}

#: PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "increase", "histogram_quantile", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "le", "vector", "inf", "nan",
}  # fmt: skip


def known_metric_names() -> set[str]:
    """Every Prometheus series name the agent's instrument tables define."""
    names: set[str] = set()
    for inst in INSTRUMENTS:
        if inst.kind == "histogram":
            names.update(f"{inst.prom_name}_{s}" for s in ("bucket", "count", "sum"))
        else:
            names.add(inst.prom_name)
    names.update(spec.prom_name for spec in load_metric_set() if spec.scope == "device")
    names.update(m.prom_name for m in CUDA_METRICS)
    names.update(d.prom_name for d in DERIVED_METRICS)  # the join's per-pod metrics
    names.add(label_name(OTLP_SPANS) + "_total")  # a self-metric counter, named as the exporter names it
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small lexer, enough for our queries)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        followed_by_call = s[m.end() :].lstrip().startswith("(")
        if word.lower() in PROMQL_WORDS or followed_by_call:
            continue
        out.add(word)
    return out


def substitute_variables(expr: str) -> str:
    """What Grafana sends for our template variables: a rate window and `.*` for "All"."""
    expr = expr.replace("$__rate_interval", "2m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def live_results(prom: Any) -> Iterator[tuple[build.Query, list[dict[str, Any]]]]:
    """Every dashboard query with what ``prom`` (a PrometheusServer) returns for it, windows
    shortened to the test's 30 s. Raises on a query Prometheus refuses."""
    for q in build.all_queries():
        yield q, prom.query(substitute_variables(q.expr).replace("[2m]", "[30s]"))


def queries_with_data(prom: Any) -> set[tuple[str, str, str]]:
    """(dashboard, panel, ref_id) of every dashboard query that returns data from ``prom``."""
    return {(q.dashboard, q.panel, q.ref_id) for q, result in live_results(prom) if result}


def legend_labels_missing(prom: Any, kubernetes: bool) -> set[tuple[str, str, str]]:
    """(dashboard, panel, label) for each ``{{label}}`` of a query's legend that a series the
    query returns from ``prom`` lacks: Grafana would draw it empty (and a ``by`` on a label the
    metric does not carry folds all its series into one). ``error_type`` may be absent (semconv
    puts it on failed requests only), and without ``kubernetes`` so may the ``k8s_*`` labels."""
    missing = set()
    for q, result in live_results(prom):
        wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend)) - {"error_type"}
        if not kubernetes:
            wanted = {label for label in wanted if not label.startswith("k8s_")}
        for series in result:
            missing.update((q.dashboard, q.panel, label) for label in wanted - set(series["metric"]))
    return missing


def promtool_check(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check rules`` on one recording rule per expression."""
    if PROMTOOL is None:
        if IN_CI:
            pytest.fail("promtool (Debian package prometheus) is missing under CI")
        pytest.skip("promtool (Debian package prometheus) not installed")
    rules = [
        {"record": f"infersight_check:{re.sub(r'[^a-zA-Z0-9_]', '_', name)}", "expr": e}
        for name, e in exprs.items()
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "infersight-check", "rules": rules}]}))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_committed_json_matches_a_fresh_build() -> None:
    stale = [str(p.relative_to(REPO)) for p in build.iter_stale()]
    assert not stale, f"regenerate with `.venv/bin/python -m dashboards.build`: {stale}"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    build.write((tmp_path,))
    assert list(build.iter_stale((tmp_path,))) == []
    victim = tmp_path / "gpu.json"
    victim.write_text(victim.read_text().replace("hw_gpu_utilization_ratio", "hw_gpu_utilisation_ratio"))
    assert list(build.iter_stale((tmp_path,))) == [victim]


def test_four_dashboards_with_the_template_variables() -> None:
    files = sorted(p.name for p in (REPO / "dashboards").glob("*.json"))
    assert files == ["agent-health.json", "gpu.json", "llm-serving.json", "request-gpu.json"]
    uids = set()
    for name in files:
        d = json.loads((REPO / "dashboards" / name).read_text())
        assert d["schemaVersion"] >= 39, "Grafana 11 schema"
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert list(variables) == ["datasource", "namespace", "pod", "model"]
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name_ in ("namespace", "pod", "model"):
            assert variables[name_]["type"] == "query"
            assert variables[name_]["datasource"]["uid"] == "${datasource}"
        for panel in d["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for t in panel["targets"]:
                assert t["refId"] and t["expr"], panel["title"]
    assert len(uids) == 4


def test_panel_ids_and_layout_do_not_overlap() -> None:
    for d in build.all_dashboards():
        panels = build.to_grafana(d)["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), d.uid
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (d.uid, p["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, (d.uid, p["title"])
            cells |= mine


def test_llm_serving_has_the_panels_the_operators_need() -> None:
    (serving,) = [d for d in build.all_dashboards() if d.uid == "infersight-llm-serving"]
    panels = {p.title: p for row in serving.rows for p in row.panels}
    heatmaps = {t for t, p in panels.items() if p.kind == "heatmap"}
    assert heatmaps == {"Request duration", "Time to first token"}
    for t in heatmaps:
        (q,) = panels[t].queries
        assert q.heatmap and "_bucket" in q.expr and "sum by (le)" in q.expr
    exprs = " ".join(q.expr for p in panels.values() for q in p.queries)
    for metric in (
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "gen_ai_server_token_usage_sum",
        "http_server_active_requests",
        "infersight_requests_aborted_total",
    ):
        assert metric in exprs
    # Latency quantiles ask for exemplars, which link a bucket to the trace of a sampled request.
    assert all(q.exemplar for q in panels["TTFT quantiles"].queries)
    rendered = json.loads((REPO / "dashboards" / "llm-serving.json").read_text())
    assert any(t.get("exemplar") for p in rendered["panels"] for t in p.get("targets", []))


def test_queries_name_only_metrics_the_agent_exports() -> None:
    known = known_metric_names() | FIXED_ELSEWHERE
    unknown = {}
    for q in build.all_queries():
        missing = metric_names(q.expr) - known
        if missing:
            unknown[f"{q.dashboard}/{q.panel}/{q.ref_id}"] = sorted(missing)
    assert not unknown


def test_gpu_metric_names_come_from_the_collectors_metric_sets() -> None:
    exported = {spec.prom_name for spec in load_metric_set() if spec.scope == "device"}
    exported |= {m.prom_name for m in CUDA_METRICS}
    exported |= {d.prom_name for d in DERIVED_METRICS}
    for series in build.GPU.all_series():
        if series.name in FIXED_ELSEWHERE:
            continue
        assert series.name in exported, series.name
    # The DCGM fields the GPU dashboard shows are the ones the DCGM collector maps.
    dcgm = {spec.field: spec.prom_name for spec in load_metric_set(source="dcgm")}
    for field, series in build.GPU.dcgm_profiling:
        assert dcgm[field] == series.name, field


def test_metric_name_lexer() -> None:
    # The cross-check above is only as good as this.
    assert metric_names('sum by (le) (rate(a_bucket{x=~"$pod"}[5m]))') == {"a_bucket"}
    assert metric_names("sum(up) / on (hw_id) group_left b * c") == {"up", "b", "c"}
    assert metric_names('histogram_quantile(0.9, sum by (le, m) (rate(x{k="a b"}[2m])))') == {"x"}
    assert metric_names("process_resident_memory_bytes and on (instance) infersight_up") == {
        "process_resident_memory_bytes",
        "infersight_up",
    }


def test_label_filters_use_the_exported_label_names() -> None:
    labels = {name for inst in INSTRUMENTS for name in inst.label_names} | {
        "le",
        "instance",
        "reason",
        "type",
        "outcome",
        "map",
    }
    for spec in load_metric_set():
        labels.update(k.replace(".", "_") for k, _ in spec.attributes)
    labels |= {build.GPU.gpu_label}
    for q in build.all_queries():
        used = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*!?=~?\"", q.expr))
        for m in re.finditer(r"\b(?:by|on)\s*\(([^)]*)\)", q.expr):
            used.update(x.strip() for x in m.group(1).split(",") if x.strip())
        assert used <= labels, (q.dashboard, q.panel, used - labels)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    queries = build.all_queries()
    assert len(queries) > 30
    exprs = {f"{q.dashboard}_{i}": substitute_variables(q.expr) for i, q in enumerate(queries)}
    for e in exprs.values():
        assert "$" not in e
    result = promtool_check(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    # Proves the check above can fail.
    result = promtool_check({"broken": "sum by (le (rate(x[2m]))"}, tmp_path)
    assert result.returncode != 0


def test_template_variable_queries_are_valid_promql(tmp_path: Path) -> None:
    # label_values(selector, label): the selector part must be a valid series selector.
    d = build.to_grafana(build.llm_serving())
    exprs = {}
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"])
        assert m, v["query"]
        exprs[v["name"]] = substitute_variables(m.group(1))
    result = promtool_check(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- gRPC beside HTTP


def test_grpc_calls_have_panels_beside_the_http_ones() -> None:
    """gRPC calls are counted in rpc.server.duration, never in http.server.*: every panel kind that
    shows HTTP requests (rate, errors, latency, in-flight) has a gRPC counterpart, and the template
    variables list pods that serve only gRPC."""
    serving = build.llm_serving()
    panels = {p.title: p for row in serving.rows for p in row.panels}
    (traffic,) = [row for row in serving.rows if row.title == "Traffic"]
    rates = " ".join(q.expr for p in traffic.panels for q in p.queries)
    for counter in ("http_server_request_duration_seconds_count", "rpc_server_duration_milliseconds_count"):
        assert f"(rate({counter}{{" in rates, counter
    calls = panels["gRPC calls by method and status"]
    (q,) = calls.queries
    assert calls.unit == "reqps" and calls.stacked
    assert q.expr.startswith(
        "sum by (rpc_method, rpc_grpc_status_code) (rate(rpc_server_duration_milliseconds_count{"
    )
    quantiles = panels["gRPC call duration quantiles"]
    assert quantiles.unit == "ms"  # rpc.server.duration is in milliseconds
    assert [q.legend for q in quantiles.queries] == [f"p{n} {{{{rpc_method}}}}" for n in (50, 90, 99)]
    assert all("rpc_server_duration_milliseconds_bucket" in q.expr and q.exemplar for q in quantiles.queries)
    # gRPC series carry no model label: choosing a model must not empty the gRPC panels.
    assert all("gen_ai_request_model" not in q.expr for p in (calls, quantiles) for q in p.queries)
    errors = panels["Error ratio"]
    assert errors.unit == "percentunit"
    assert [(q.legend, q.expr.count('error_type!=""')) for q in errors.queries] == [
        ("HTTP", 1),
        ("gRPC {{rpc_method}}", 1),
    ]
    assert "http_server_request_duration_seconds_count" in errors.queries[0].expr
    assert "rpc_server_duration_milliseconds_count" in errors.queries[1].expr
    for d, title in ((serving, "In-flight requests"), (build.request_gpu(), "In-flight requests per pod")):
        (p,) = [p for row in d.rows for p in row.panels if p.title == title]
        assert [q.expr for q in p.queries] == [build.ACTIVE_BY_POD, build.RPC_CONCURRENCY_BY_POD]
        assert "gRPC" in p.description
    variables = {v["name"]: v["query"] for v in build.to_grafana(serving)["templating"]["list"]}
    for name in ("namespace", "pod"):
        assert (
            '{__name__=~"http_server_request_duration_seconds_count|rpc_server_duration_milliseconds_count"'
            in (variables[name])
        )


POD_LABELS = {"k8s.namespace.name": "serving"}


def _prometheus_api(prom: Any, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{prom.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def test_request_panels_count_grpc_and_http_correctly(tmp_path: Path) -> None:
    """The exporter fed known gRPC and HTTP records, the Debian Prometheus scraping it: the panels'
    values are what those records say. Every series grows by the same round of records, so rate()
    extrapolates them alike and ratios and quantiles are exact."""
    from agent.export.exporters import ExportConfig, Exporters
    from agent.selfmetrics import SelfMetrics
    from tests.otlp_receiver import free_port
    from tests.test_export_canary import make_request
    from tests.test_export_prometheus import PrometheusServer, prometheus_binary
    from tests.test_export_rpc import grpc_request

    if prometheus_binary() is None:
        if IN_CI:
            pytest.fail("prometheus (Debian package) is missing under CI")
        pytest.skip("prometheus binary missing (apt-get install -y prometheus)")
    triton = {**POD_LABELS, "k8s.pod.name": "triton-0"}
    vllm = {**POD_LABELS, "k8s.pod.name": "vllm-0"}
    # One round: ModelInfer 12, 12 ms OK, 3 ms NOT_FOUND (a client error), 40 ms UNAVAILABLE (a
    # server error); two 500 ms ModelStreamInfer streams; three HTTP 200 and one HTTP 500.
    rnd = [
        *(grpc_request("ModelInfer", 0, duration_s=0.012, request_model="densenet") for _ in range(2)),
        grpc_request("ModelInfer", 5, duration_s=0.003, request_model="missing"),
        grpc_request("ModelInfer", 14, duration_s=0.040, request_model="densenet"),
        *(grpc_request("ModelStreamInfer", 0, duration_s=0.5, streaming=True) for _ in range(2)),
    ]
    rnd = [r.with_attributes(triton) for r in rnd]
    http = [
        make_request(path="/v1/completions", status_code=s).with_attributes(vllm)
        for s in (200, 200, 200, 500)
    ]
    port = free_port()
    ex = Exporters(
        ExportConfig(otlp_endpoint="", prometheus_port=port, prometheus_host="127.0.0.1"),
        metrics=SelfMetrics(),
    )
    prom = None
    try:

        def emit_round() -> None:
            for r in (*rnd, *http):
                ex.emit(r)

        emit_round()  # before the first scrape: every series starts from one whole round
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
        prom.wait_for("sum(rpc_server_duration_milliseconds_count)", lambda r: bool(r), timeout=60)
        for _ in range(3):
            time.sleep(1.5)  # more than a scrape interval apart
            emit_round()
        prom.wait_for(
            "sum(rpc_server_duration_milliseconds_count) + sum(http_server_request_duration_seconds_count)",
            lambda r: bool(r) and float(r[0]["value"][1]) == 4 * (6 + 4),
        )
        # the records carry pod labels: every legend label of the request panels is on their series
        assert {m for m in legend_labels_missing(prom, kubernetes=True) if m[0] != "agent-health"} == set()
        # One evaluation time for every query: rate() extrapolates to the end of its window.
        at = f"{time.time():.3f}"
        results = {}
        for q in build.all_queries():
            if q.dashboard in ("llm-serving", "request-gpu"):
                answer = _prometheus_api(prom, "query", query=substitute_variables(q.expr), time=at)
                results[(q.panel, q.ref_id)] = {
                    tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["result"]
                }
        calls = results[("gRPC calls by method and status", "A")]
        by_call = {(dict(k)["rpc_method"], dict(k)["rpc_grpc_status_code"]): v for k, v in calls.items()}
        assert set(by_call) == {
            ("ModelInfer", "0"),
            ("ModelInfer", "5"),
            ("ModelInfer", "14"),
            ("ModelStreamInfer", "0"),
        }
        one = by_call[("ModelInfer", "14")]
        assert one > 0
        assert by_call[("ModelInfer", "0")] == pytest.approx(2 * one)
        assert by_call[("ModelInfer", "5")] == pytest.approx(one)
        assert by_call[("ModelStreamInfer", "0")] == pytest.approx(2 * one)
        # The HTTP panel holds the HTTP requests only: one route, no gRPC path.
        http_rows = results[("HTTP requests by route and status", "A")]
        assert {dict(k)["http_route"] for k in http_rows} == {"/v1/completions"}
        assert sum(http_rows.values()) == pytest.approx(4 * one)
        # Error ratio: 1 of 4 HTTP requests (the 500); 1 of 4 ModelInfer calls (UNAVAILABLE; NOT_FOUND
        # is the client's error); no ModelStreamInfer call: 0, not an empty series.
        assert list(results[("Error ratio", "A")].values()) == [pytest.approx(0.25)]
        rpc_errors = {dict(k)["rpc_method"]: v for k, v in results[("Error ratio", "B")].items()}
        assert rpc_errors == {"ModelInfer": pytest.approx(0.25), "ModelStreamInfer": 0.0}
        # Quantiles in ms. ModelInfer {3, 12, 12, 40}: the median interpolates in (10, 25] at rank 2
        # of 4 (one below 10, three up to 25): 10 + 15 * 1/2. Streams {500, 500}: (250, 500] at 1 of 2.
        p50 = {dict(k)["rpc_method"]: v for k, v in results[("gRPC call duration quantiles", "A")].items()}
        assert p50 == {"ModelInfer": pytest.approx(17.5), "ModelStreamInfer": pytest.approx(375.0)}
        # In flight: the HTTP pod from its gauge (0 now, not a gap); the gRPC pod from Little's law,
        # the rate of call time: calls/s x mean duration (1067 ms over 6 calls per round).
        for panel in (("In-flight requests", "A"), ("In-flight requests per pod", "A")):
            assert {dict(k)["k8s_pod_name"]: v for k, v in results[panel].items()} == {"vllm-0": 0.0}
        for panel in (("In-flight requests", "B"), ("In-flight requests per pod", "B")):
            grpc_in_flight = {dict(k)["k8s_pod_name"]: v for k, v in results[panel].items()}
            assert grpc_in_flight == {"triton-0": pytest.approx(6 * one * 1.067 / 6)}
        # The LLM request panel counts the gRPC calls that name a model, beside the HTTP ones.
        llm = {dict(k).get("gen_ai_request_model"): v for k, v in results[("LLM requests by model and error", "A")].items()
               if "error_type" not in dict(k)}  # fmt: skip
        assert llm["densenet"] == pytest.approx(2 * one) and llm["missing"] == pytest.approx(one)
        # The pod variable (what Grafana asks: label values of the series its selector matches)
        # offers the gRPC-only pod as well as the HTTP one.
        variables = {
            v["name"]: v["query"] for v in build.to_grafana(build.llm_serving())["templating"]["list"]
        }
        for name, label, want in (("namespace", "k8s_namespace_name", ["serving"]),
                                  ("pod", "k8s_pod_name", ["triton-0", "vllm-0"])):  # fmt: skip
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name])
            assert m and m.group(2) == label
            got = _prometheus_api(
                prom, f"label/{label}/values", **{"match[]": substitute_variables(m.group(1))}
            )
            assert got == want, name
    finally:
        if prom is not None:
            prom.stop()
        ex.shutdown()


# --------------------------------------------------------------------------- live: real agent, real Prometheus

#: Panels that must show data when a real agent watches a real streaming server (no GPU, no
#: Kubernetes, no client aborts here: the GPU, CUDA, per-pod share and aborted panels stay empty).
LIVE_PANELS_WITH_DATA = {
    ("llm-serving", "LLM requests by model and error"),
    ("llm-serving", "HTTP requests by route and status"),
    ("llm-serving", "In-flight requests"),
    ("llm-serving", "Request duration"),
    ("llm-serving", "Request duration quantiles"),
    ("llm-serving", "Time to first token"),
    ("llm-serving", "TTFT quantiles"),
    ("llm-serving", "Time per output token"),
    ("llm-serving", "HTTP request duration p90 by route"),
    ("llm-serving", "Tokens per second"),
    ("llm-serving", "Tokens per request (mean)"),
    ("request-gpu", "TTFT p90 per pod"),
    ("request-gpu", "Request duration p90 per pod"),
    ("request-gpu", "In-flight requests per pod"),
    ("agent-health", "Agents up"),
    ("agent-health", "Lost events"),
    ("agent-health", "Requests lost, kernel state evicted"),
    ("agent-health", "BPF map fill"),
    ("agent-health", "Agent CPU"),
    ("agent-health", "Agent RSS"),
}


@pytest.mark.ebpf
@pytest.mark.slow
def test_dashboard_queries_against_a_real_agent(tmp_path: Path) -> None:
    """The demo server under streaming load, `infersight run` attached to it, Prometheus scraping
    the agent: every dashboard query evaluates, and the serving panels show data."""
    import httpx

    from tests.harness import free_port, start_demo_server, wait_for
    from tests.test_export_prometheus import PrometheusServer, prometheus_binary

    if prometheus_binary() is None:
        if IN_CI:
            pytest.fail("prometheus (Debian package) is missing under CI")
        pytest.skip("prometheus binary missing (apt-get install -y prometheus)")
    srv = start_demo_server(tmp_path)
    metrics_port = free_port()
    log = tmp_path / "agent.log"
    stop = threading.Event()
    agent = prom = None
    try:
        with open(log, "w") as logf:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--pid", str(srv.pid)],
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), "INFERSIGHT_PROMETHEUS_PORT": str(metrics_port)},
            )
        wait_for(lambda: "attached to 1 target" in log.read_text(), 60, 0.2, "agent attached")

        def load() -> None:
            # A steady trickle, so that rate() over the window has points on both sides.
            body = {
                "model": "dash-model",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 6,
                "stream_options": {"include_usage": True},
            }
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                while not stop.is_set():
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        for _ in r.iter_bytes():
                            pass
                    c.get("/health")
                    stop.wait(0.2)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{metrics_port}"])
        prom.wait_for(
            'sum(rate(gen_ai_server_request_duration_seconds_count{gen_ai_request_model="dash-model"}[30s]))',
            lambda r: bool(r) and float(r[0]["value"][1]) > 0,
            timeout=60,
        )
        with_data = {(d, panel) for d, panel, _ in queries_with_data(prom)}
        missing = LIVE_PANELS_WITH_DATA - with_data
        assert not missing, f"panels without data: {sorted(missing)}\nagent log:\n{log.read_text()[-3000:]}"
        assert legend_labels_missing(prom, kubernetes=False) == set()
        # Every variable query finds our model.
        models = prom.query(
            'group by (gen_ai_request_model) (gen_ai_server_request_duration_seconds_count{k8s_namespace_name=~".*",k8s_pod_name=~".*"})'
        )
        assert {r["metric"].get("gen_ai_request_model") for r in models} == {"dash-model"}
    finally:
        stop.set()
        if prom is not None:
            prom.stop()
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
        srv.stop()


#: gRPC panels (and series) that must show data when a real agent watches a real KServe v2 gRPC
#: server; the HTTP request panels must not (gRPC calls are not HTTP requests in the metrics).
LIVE_GRPC_WITH_DATA = {
    ("llm-serving", "gRPC calls by method and status", "A"),
    ("llm-serving", "gRPC call duration quantiles", "A"),
    ("llm-serving", "gRPC call duration quantiles", "C"),
    ("llm-serving", "Error ratio", "B"),
    ("llm-serving", "In-flight requests", "B"),
    ("llm-serving", "LLM requests by model and error", "A"),
    ("llm-serving", "Time to first token", "A"),
    ("llm-serving", "TTFT quantiles", "A"),
    ("request-gpu", "In-flight requests per pod", "B"),
}
LIVE_GRPC_WITHOUT_DATA = {
    ("llm-serving", "HTTP requests by route and status", "A"),
    ("llm-serving", "HTTP request duration p90 by route", "A"),
    ("llm-serving", "Error ratio", "A"),
}


@pytest.mark.ebpf
@pytest.mark.slow
def test_grpc_panels_against_a_real_agent(tmp_path: Path) -> None:
    """The KServe v2 gRPC test server driven by ``tritonclient`` (unary ModelInfer and streaming
    ModelStreamInfer), `infersight run` attached to it, Prometheus scraping the agent: the gRPC
    panels show the calls, the HTTP ones stay empty."""
    from tests.harness import free_port, wait_for
    from tests.test_export_prometheus import PrometheusServer, prometheus_binary
    from tests.test_grpc_e2e import KServe

    if prometheus_binary() is None:
        if IN_CI:
            pytest.fail("prometheus (Debian package) is missing under CI")
        pytest.skip("prometheus binary missing (apt-get install -y prometheus)")
    kserve = KServe(tmp_path)
    metrics_port = free_port()
    log = tmp_path / "agent.log"
    stop = threading.Event()
    agent = prom = None
    loader = None
    try:
        with open(log, "w") as logf:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--pid", str(kserve.pid)],
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), "INFERSIGHT_PROMETHEUS_PORT": str(metrics_port)},
            )
        wait_for(lambda: "attached to 1 target" in log.read_text(), 60, 0.2, "agent attached")
        # The HTTP/2 capture loads after the attach; a connection made before it is not walked.
        wait_for(lambda: "HTTP/2 capture ready" in log.read_text(), 60, 0.2, "HTTP/2 capture")
        kserve.connect()

        def load() -> None:
            i = 0
            while not stop.is_set():
                kserve.call(op="infer", model="simple", id=f"u{i}", delay_ms=5)
                if i % 3 == 0:
                    kserve.call(
                        op="stream",
                        model="simple_stream",
                        interval_ms=5,
                        requests=[{"id": f"s{i}", "responses": 3}],
                    )
                i += 1
                stop.wait(0.2)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{metrics_port}"])
        prom.wait_for(
            'sum(rate(rpc_server_duration_milliseconds_count{rpc_method="ModelStreamInfer"}[30s]))',
            lambda r: bool(r) and float(r[0]["value"][1]) > 0,
            timeout=60,
        )
        with_data = queries_with_data(prom)
        missing = LIVE_GRPC_WITH_DATA - with_data
        assert not missing, f"without data: {sorted(missing)}\nagent log:\n{log.read_text()[-3000:]}"
        assert not LIVE_GRPC_WITHOUT_DATA & with_data
        assert legend_labels_missing(prom, kubernetes=False) == set()
        methods = prom.query("sum by (rpc_method, rpc_service) (rpc_server_duration_milliseconds_count)")
        assert {(r["metric"]["rpc_service"], r["metric"]["rpc_method"]) for r in methods} == {
            ("inference.GRPCInferenceService", "ModelInfer"),
            ("inference.GRPCInferenceService", "ModelStreamInfer"),
        }
        # The quantile panel is in ms: a ModelInfer whose handler sleeps 5 ms takes more than 5 and
        # far less than 1000.
        (p50_query, *_) = [q for q in build.all_queries() if q.panel == "gRPC call duration quantiles"]
        p50 = {
            r["metric"]["rpc_method"]: float(r["value"][1])
            for r in prom.query(substitute_variables(p50_query.expr).replace("[2m]", "[30s]"))
        }
        assert 5 < p50["ModelInfer"] < 1000, p50
    finally:
        stop.set()
        if loader is not None:
            loader.join(30)
        if prom is not None:
            prom.stop()
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
        kserve.stop()
    assert "Traceback" not in log.read_text()
