"""Grafana dashboards for infersight, built as code.

Four dashboards (Grafana 11 schema, ``grafana-foundation-sdk==1769699379!11.6.0``):

* ``llm-serving.json``   request rate, duration and TTFT heatmaps and quantiles, time per output
  token, tokens/s, in-flight and aborted requests, gRPC calls (rate, duration, errors) beside HTTP
  ones, with exemplars linking to traces;
* ``gpu.json``           utilisation, memory, power and XID errors per GPU, per-pod share, DCGM
  profiling fields when a dcgm-exporter is scraped too;
* ``request-gpu.json``   request latency beside GPU utilisation and CUDA activity per pod, energy
  and GPU-seconds per output token;
* ``agent-health.json``  lost events, parse failures, export outcomes, CPU, RSS, BPF map fill.

Every panel query is a :class:`Query`; :func:`all_queries` lists them so that tests can check each
one (``promtool check rules`` today, a live Prometheus later).

Regenerate the committed JSON after a change::

    .venv/bin/python -m dashboards.build          # writes dashboards/*.json and the chart's copy
    .venv/bin/python -m dashboards.build --check  # exit 1 when the committed JSON is stale

Pure functions; nothing here touches the network or Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import prometheus as prom_m

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Where the generated JSON goes: the repository's copy and the Helm chart's (Helm can only read
#: files inside the chart directory).
OUTPUT_DIRS = (HERE, REPO / "helm" / "infersight" / "dashboards")


@dataclass(frozen=True)
class Series:
    """A metric name with the matchers that always go with it (``hw_type="gpu"``)."""

    name: str
    matchers: str = ""

    def select(self, *extra: str) -> str:
        """The selector ``name{matchers,extra...}`` (no braces when there is nothing to match)."""
        inner = ",".join(m for m in (self.matchers, *extra) if m)
        return f"{self.name}{{{inner}}}" if inner else self.name


@dataclass(frozen=True)
class GpuMetrics:
    """Prometheus names of the GPU metrics, in one place.

    The collectors export the OpenTelemetry hardware conventions (``hw.gpu.*``, ``hw.power``,
    ``hw.energy``, ``hw.errors``; see ``collectors/gpu_metrics.csv``) and the exporter names them
    in base units. The names are still being settled, so every GPU panel takes them from here, and
    ``tests/test_dashboards.py`` checks them against the collectors' and the CUDA probe's metric sets.
    """

    #: Label naming one GPU (OTel ``hw.id``: the GPU UUID).
    gpu_label: str = "hw_id"
    utilization: Series = Series("hw_gpu_utilization_ratio")
    memory_used: Series = Series("hw_gpu_memory_usage_bytes")
    memory_limit: Series = Series("hw_gpu_memory_limit_bytes")
    power: Series = Series("hw_power_watts", 'hw_type="gpu"')
    energy: Series = Series("hw_energy_joules_total", 'hw_type="gpu"')
    xid_errors: Series = Series("hw_errors_total", 'hw_type="gpu",error_type="xid"')
    #: Share of one GPU's busy time attributed to a pod (0..1), labelled with hw_id and k8s_*
    #: (the join's per-pod metrics, agent/join.py).
    pod_share: Series = Series("infersight_pod_gpu_utilization_share_ratio")
    #: GPU-seconds and GPU energy per output token, per pod (the join, over its ratio window).
    gpu_seconds_per_token: Series = Series("infersight_pod_gpu_time_per_output_token_seconds")
    energy_per_token: Series = Series("infersight_pod_gpu_energy_per_output_token_joules")
    cuda_launches: Series = Series("gpu_cuda_kernel_launch_calls_total")
    cuda_memcpy_bytes: Series = Series("gpu_cuda_memcpy_bytes_total")
    #: DCGM profiling fields as the agent re-exports them (when a DCGM host engine or exporter is
    #: present), with the DCGM field each comes from.
    dcgm_profiling: tuple[tuple[str, Series], ...] = (
        ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", Series("hw_gpu_graphics_engine_active_ratio")),
        ("DCGM_FI_PROF_SM_ACTIVE", Series("hw_gpu_sm_active_ratio")),
        ("DCGM_FI_PROF_SM_OCCUPANCY", Series("hw_gpu_sm_occupancy_ratio")),
        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", Series("hw_gpu_pipe_active_ratio", 'hw_gpu_pipe="tensor"')),
        ("DCGM_FI_PROF_DRAM_ACTIVE", Series("hw_gpu_dram_active_ratio")),
    )

    def all_series(self) -> list[Series]:
        return [
            self.utilization, self.memory_used, self.memory_limit, self.power, self.energy, self.xid_errors,
            self.pod_share, self.gpu_seconds_per_token, self.energy_per_token, self.cuda_launches,
            self.cuda_memcpy_bytes, *(s for _, s in self.dcgm_profiling),
        ]  # fmt: skip


GPU = GpuMetrics()

# Template-variable filters. `=~` because the variables are multi-valued with an "All" of `.*`.
POD = 'k8s_namespace_name=~"$namespace",k8s_pod_name=~"$pod"'
MODEL = POD + ',gen_ai_request_model=~"$model"'
RATE = "$__rate_interval"
# process_* series come from many targets; the agent's are those whose target also exports infersight_up.
AGENT_ONLY = "and on (instance) infersight_up"
#: Request counters: HTTP requests and gRPC calls are counted in separate histograms (a gRPC call
#: is in rpc.server.duration, never in http.server.request.duration; docs/metrics.md), so a panel
#: or variable that means "all requests" reads both.
HTTP = "http_server_request_duration_seconds"
RPC = "rpc_server_duration_milliseconds"
REQUEST_COUNTERS = f'__name__=~"{HTTP}_count|{RPC}_count"'
# The in-flight gauge has series only while a request is in flight; show 0 for pods that served
# requests before, rather than a gap.
ACTIVE_BY_POD = (
    f"sum by (k8s_pod_name) (http_server_active_requests{{{POD}}})"
    f" or (0 * sum by (k8s_pod_name) ({HTTP}_count{{{POD}}}))"
)
# gRPC has no in-flight gauge (the RPC conventions define none). Little's law gives the mean number
# of calls in progress over the window: the duration sum (ms) grows by the time every completed call
# took, so its rate / 1000 is calls x seconds per second. Only completed calls count: a long
# ModelStreamInfer stream adds its whole life when it ends.
RPC_CONCURRENCY_BY_POD = f"sum by (k8s_pod_name) (rate({RPC}_sum{{{POD}}}[{RATE}])) / 1000"
IN_FLIGHT_DESCRIPTION = (
    "HTTP: requests received and not yet answered, per pod (queued and running). gRPC has no in-flight "
    "gauge: its series is the mean number of calls in progress over the window, from the calls that "
    "completed (rate of the duration sum); a long ModelStreamInfer stream counts when it ends."
)


@dataclass(frozen=True)
class Query:
    """One panel query: where it is shown and its PromQL (with Grafana variables unexpanded)."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    legend: str = ""
    #: A heatmap query: `le` buckets, shown as Prometheus' heatmap format.
    heatmap: bool = False
    #: Ask Prometheus for exemplars (trace ids) with this query.
    exemplar: bool = False


@dataclass(frozen=True)
class Panel:
    """One panel of a dashboard, before it becomes a Grafana builder."""

    title: str
    kind: str  # "timeseries", "heatmap" or "stat"
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    width: int = 12
    height: int = 8
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    filename: str
    description: str
    rows: tuple[Row, ...]


def _q(expr: str, legend: str = "", **kw: Any) -> tuple[str, str, dict[str, Any]]:
    return (expr, legend, kw)


def _panel(
    dashboard: str,
    title: str,
    kind: str,
    unit: str,
    *queries: tuple[str, str, dict[str, Any]],
    **kw: Any,
) -> Panel:
    refs = "ABCDEFGHIJ"
    qs = tuple(
        Query(dashboard=dashboard, panel=title, ref_id=refs[i], expr=expr, legend=legend, **extra)
        for i, (expr, legend, extra) in enumerate(queries)
    )
    return Panel(title=title, kind=kind, unit=unit, queries=qs, **kw)


def _quantiles(
    dashboard: str, title: str, metric: str, by: str, description: str, unit: str = "s", match: str = MODEL
) -> Panel:
    return _panel(
        dashboard,
        title,
        "timeseries",
        unit,
        *(
            _q(
                f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{match}}}[{RATE}])))",
                f"p{round(q * 100)} {{{{{by}}}}}",
                exemplar=True,
            )
            for q in (0.5, 0.9, 0.99)
        ),
        description=description,
    )


def _error_ratio(metric: str, by: str = "") -> str:
    """Share of ``metric``'s requests that have an ``error_type``; 0 (not empty) while none failed."""
    agg = f"sum by ({by}) " if by else "sum"
    failed = f'{agg}(rate({metric}_count{{{POD},error_type!=""}}[{RATE}]))'
    every = f"{agg}(rate({metric}_count{{{POD}}}[{RATE}]))"
    return f"({failed} or 0 * {every}) / {every}"


def _in_flight(dashboard: str, title: str, description: str = "") -> Panel:
    return _panel(
        dashboard,
        title,
        "timeseries",
        "short",
        _q(ACTIVE_BY_POD, "{{k8s_pod_name}}"),
        _q(RPC_CONCURRENCY_BY_POD, "{{k8s_pod_name}} gRPC (mean)"),
        description=description,
    )


def _heatmap(dashboard: str, title: str, metric: str, description: str) -> Panel:
    return _panel(
        dashboard,
        title,
        "heatmap",
        "s",
        _q(
            f"sum by (le) (increase({metric}_bucket{{{MODEL}}}[{RATE}]))",
            "{{le}}",
            heatmap=True,
            exemplar=True,
        ),
        description=description,
    )


def llm_serving() -> Dashboard:
    d = "llm-serving"
    req = "gen_ai_server_request_duration_seconds"
    ttft = "gen_ai_server_time_to_first_token_seconds"
    tpot = "gen_ai_server_time_per_output_token_seconds"
    return Dashboard(
        uid="infersight-llm-serving",
        title="infersight / LLM serving",
        filename="llm-serving.json",
        description="Requests to inference servers as seen on the wire: rate, latency, TTFT, tokens.",
        rows=(
            Row(
                "Traffic",
                (
                    _panel(
                        d,
                        "LLM requests by model and error",
                        "timeseries",
                        "reqps",
                        _q(
                            f"sum by (gen_ai_request_model, error_type) (rate({req}_count{{{MODEL}}}[{RATE}]))",
                            "{{gen_ai_request_model}} {{error_type}}",
                        ),
                        stacked=True,
                    ),
                    _panel(
                        d,
                        "HTTP requests by route and status",
                        "timeseries",
                        "reqps",
                        _q(
                            "sum by (http_route, http_response_status_code) "
                            f"(rate(http_server_request_duration_seconds_count{{{POD}}}[{RATE}]))",
                            "{{http_route}} {{http_response_status_code}}",
                        ),
                        stacked=True,
                    ),
                    _panel(
                        d,
                        "gRPC calls by method and status",
                        "timeseries",
                        "reqps",
                        _q(
                            f"sum by (rpc_method, rpc_grpc_status_code) (rate({RPC}_count{{{POD}}}[{RATE}]))",
                            "{{rpc_method}} {{rpc_grpc_status_code}}",
                        ),
                        description="gRPC calls (Triton / KServe v2 ModelInfer, ModelStreamInfer, ...) by "
                        "method and gRPC status code; they are not in the HTTP panel. No status code: the "
                        "call ended without trailers (reset).",
                        stacked=True,
                    ),
                    _panel(
                        d,
                        "Error ratio",
                        "timeseries",
                        "percentunit",
                        _q(_error_ratio(HTTP), "HTTP"),
                        _q(_error_ratio(RPC, "rpc_method"), "gRPC {{rpc_method}}"),
                        description="Share of requests with an error_type: HTTP 5xx, gRPC server-error codes "
                        "(UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), and "
                        "calls that ended without a status (reset, goaway, close).",
                    ),
                    _in_flight(d, "In-flight requests", IN_FLIGHT_DESCRIPTION),
                    _panel(
                        d,
                        "Aborted requests",
                        "timeseries",
                        "reqps",
                        _q(
                            f"sum by (k8s_pod_name) (rate(infersight_requests_aborted_total{{{POD}}}[{RATE}]))",
                            "{{k8s_pod_name}}",
                        ),
                        description="Requests whose client went away before the response finished.",
                    ),
                ),
            ),
            Row(
                "Latency",
                (
                    _heatmap(
                        d, "Request duration", req, "Whole LLM request, first byte in to last byte out."
                    ),
                    _quantiles(
                        d, "Request duration quantiles", req, "gen_ai_request_model", "p50/p90/p99 by model."
                    ),
                    _heatmap(
                        d, "Time to first token", ttft, "First streamed content after the request arrived."
                    ),
                    _quantiles(d, "TTFT quantiles", ttft, "gen_ai_request_model", "p50/p90/p99 by model."),
                    _quantiles(
                        d,
                        "Time per output token",
                        tpot,
                        "gen_ai_request_model",
                        "Decode time per output token after the first (inter-token latency).",
                    ),
                    _panel(
                        d,
                        "HTTP request duration p90 by route",
                        "timeseries",
                        "s",
                        _q(
                            "histogram_quantile(0.9, sum by (le, http_route) "
                            f"(rate(http_server_request_duration_seconds_bucket{{{POD}}}[{RATE}])))",
                            "{{http_route}}",
                            exemplar=True,
                        ),
                    ),
                    _quantiles(
                        d,
                        "gRPC call duration quantiles",
                        RPC,
                        "rpc_method",
                        "p50/p90/p99 of rpc.server.duration (ms) by method. A ModelStreamInfer call lasts "
                        "as long as its stream; its first response is in Time to first token.",
                        unit="ms",
                        match=POD,
                    ),
                ),
            ),
            Row(
                "Tokens",
                (
                    _panel(
                        d,
                        "Tokens per second",
                        "timeseries",
                        "short",
                        _q(
                            "sum by (gen_ai_request_model, gen_ai_token_type) "
                            f"(rate(gen_ai_server_token_usage_sum{{{MODEL}}}[{RATE}]))",
                            "{{gen_ai_request_model}} {{gen_ai_token_type}}",
                        ),
                        stacked=True,
                    ),
                    _panel(
                        d,
                        "Tokens per request (mean)",
                        "timeseries",
                        "short",
                        _q(
                            "sum by (gen_ai_token_type) (rate(gen_ai_server_token_usage_sum{"
                            + MODEL
                            + f"}}[{RATE}])) / sum by (gen_ai_token_type) "
                            f"(rate(gen_ai_server_token_usage_count{{{MODEL}}}[{RATE}]))",
                            "{{gen_ai_token_type}}",
                        ),
                    ),
                ),
            ),
        ),
    )


def gpu() -> Dashboard:
    d = "gpu"
    g = GPU.gpu_label
    dcgm_queries = tuple(
        _q(f"avg by ({g}) ({series.select()})", f"{field.removeprefix('DCGM_FI_PROF_')} {{{{{g}}}}}")
        for field, series in GPU.dcgm_profiling
    )
    return Dashboard(
        uid="infersight-gpu",
        title="infersight / GPU",
        filename="gpu.json",
        description="GPU state per device from NVML, per-pod share, and DCGM profiling fields when present.",
        rows=(
            Row(
                "Devices",
                (
                    _panel(
                        d,
                        "Utilisation",
                        "timeseries",
                        "percentunit",
                        _q(f"avg by ({g}) ({GPU.utilization.select()})", f"{{{{{g}}}}}"),
                    ),
                    _panel(
                        d,
                        "Memory used",
                        "timeseries",
                        "bytes",
                        _q(f"sum by ({g}) ({GPU.memory_used.select()})", f"used {{{{{g}}}}}"),
                        _q(f"sum by ({g}) ({GPU.memory_limit.select()})", f"limit {{{{{g}}}}}"),
                    ),
                    _panel(
                        d,
                        "Power",
                        "timeseries",
                        "watt",
                        _q(f"sum by ({g}) ({GPU.power.select()})", f"{{{{{g}}}}}"),
                    ),
                    _panel(
                        d,
                        "XID errors",
                        "timeseries",
                        "short",
                        _q(f"sum by ({g}) (increase({GPU.xid_errors.select()}[{RATE}]))", f"{{{{{g}}}}}"),
                        description="NVIDIA XID events (driver-reported GPU errors) per GPU.",
                    ),
                ),
            ),
            Row(
                "Pods",
                (
                    _panel(
                        d,
                        "GPU share per pod",
                        "timeseries",
                        "percentunit",
                        _q(
                            f"sum by (k8s_pod_name, {g}) ({GPU.pod_share.select(POD)})",
                            f"{{{{k8s_pod_name}}}} {{{{{g}}}}}",
                        ),
                        description="Share of each GPU's busy time attributed to a pod (time-slicing, MPS, MIG).",
                        stacked=True,
                        width=24,
                    ),
                ),
            ),
            Row(
                "DCGM profiling (when a dcgm-exporter is scraped)",
                (
                    _panel(
                        d,
                        "DCGM profiling fields",
                        "timeseries",
                        "percentunit",
                        *dcgm_queries,
                        description="From NVIDIA dcgm-exporter; empty when none is scraped.",
                        width=24,
                    ),
                ),
            ),
        ),
    )


def request_gpu() -> Dashboard:
    d = "request-gpu"
    return Dashboard(
        uid="infersight-request-gpu",
        title="infersight / Request and GPU",
        filename="request-gpu.json",
        description="Request latency beside the GPU work behind it, per pod.",
        rows=(
            Row(
                "Latency and GPU per pod",
                (
                    _panel(
                        d,
                        "TTFT p90 per pod",
                        "timeseries",
                        "s",
                        _q(
                            "histogram_quantile(0.9, sum by (le, k8s_pod_name) "
                            f"(rate(gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL}}}[{RATE}])))",
                            "{{k8s_pod_name}}",
                            exemplar=True,
                        ),
                    ),
                    _panel(
                        d,
                        "GPU share per pod",
                        "timeseries",
                        "percentunit",
                        _q(f"sum by (k8s_pod_name) ({GPU.pod_share.select(POD)})", "{{k8s_pod_name}}"),
                    ),
                    _panel(
                        d,
                        "Request duration p90 per pod",
                        "timeseries",
                        "s",
                        _q(
                            "histogram_quantile(0.9, sum by (le, k8s_pod_name) "
                            f"(rate(gen_ai_server_request_duration_seconds_bucket{{{MODEL}}}[{RATE}])))",
                            "{{k8s_pod_name}}",
                            exemplar=True,
                        ),
                    ),
                    _panel(
                        d,
                        "CUDA kernel launches per pod",
                        "timeseries",
                        "ops",
                        _q(
                            f"sum by (k8s_pod_name) (rate({GPU.cuda_launches.select(POD)}[{RATE}]))",
                            "{{k8s_pod_name}}",
                        ),
                    ),
                    _panel(
                        d,
                        "CUDA memcpy per pod",
                        "timeseries",
                        "Bps",
                        _q(
                            f"sum by (k8s_pod_name) (rate({GPU.cuda_memcpy_bytes.select(POD)}[{RATE}]))",
                            "{{k8s_pod_name}}",
                        ),
                    ),
                    _in_flight(d, "In-flight requests per pod", IN_FLIGHT_DESCRIPTION),
                ),
            ),
            Row(
                "Cost per token",
                (
                    _panel(
                        d,
                        "GPU-seconds per output token",
                        "timeseries",
                        "s",
                        _q(
                            f"max by (k8s_pod_name) ({GPU.gpu_seconds_per_token.select(POD)})",
                            "{{k8s_pod_name}}",
                        ),
                        description="GPU time the pod used (its share of each GPU it runs on) over the output "
                        "tokens it produced, in the agent's ratio window.",
                    ),
                    _panel(
                        d,
                        "Energy per output token",
                        "timeseries",
                        "joule",
                        _q(
                            f"max by (k8s_pod_name) ({GPU.energy_per_token.select(POD)})",
                            "{{k8s_pod_name}}",
                        ),
                        description="NVML energy over the pod's share of each GPU, over the output tokens it "
                        "produced, in the agent's ratio window.",
                    ),
                ),
            ),
        ),
    )


def agent_health() -> Dashboard:
    d = "agent-health"
    node = "{{instance}}"
    return Dashboard(
        uid="infersight-agent-health",
        title="infersight / Agent health",
        filename="agent-health.json",
        description="Is the data complete? Drops, parse failures, export failures and the agent's own cost.",
        rows=(
            Row(
                "Completeness",
                (
                    _panel(d, "Agents up", "stat", "short", _q("sum(infersight_up)", "agents up"), width=6),
                    _panel(
                        d,
                        "Lost events",
                        "timeseries",
                        "cps",
                        _q(
                            f"sum by (instance, type) (rate(infersight_events_lost_total[{RATE}]))",
                            f"{node} {{{{type}}}}",
                        ),
                        description="Kernel records the ring buffer refused (it was full), by record type.",
                        width=9,
                    ),
                    _panel(
                        d,
                        "Requests lost, kernel state evicted",
                        "timeseries",
                        "cps",
                        _q(
                            f"sum by (instance, reason) (rate(infersight_requests_lost_total[{RATE}]))",
                            f"{node} lost: {{{{reason}}}}",
                        ),
                        _q(
                            f"sum by (instance, map) (rate(infersight_bpf_map_evictions_total[{RATE}]))",
                            f"{node} evicted: {{{{map}}}}",
                        ),
                        _q(
                            f"sum by (instance) (rate(infersight_kernel_tail_rings_reclaimed_total[{RATE}]))",
                            f"{node} tail rings reclaimed",
                        ),
                        description="Requests seen but not recorded, by reason; connections the kernel map"
                        " evicted (their state lost); streams whose tail ring a newer one took (their"
                        " earlier kept writes lost, their end kept).",
                        width=9,
                    ),
                    _panel(
                        d,
                        "Parse failures",
                        "timeseries",
                        "cps",
                        _q(
                            f"sum by (instance, reason) (rate(infersight_parse_failures_total[{RATE}]))",
                            f"{node} {{{{reason}}}}",
                        ),
                        width=8,
                    ),
                    _panel(
                        d,
                        "Span exports by outcome",
                        "timeseries",
                        "cps",
                        _q(
                            f"sum by (outcome) (rate(infersight_export_spans_total[{RATE}]))",
                            "{{outcome}}",
                        ),
                        stacked=True,
                        width=8,
                    ),
                    _panel(
                        d,
                        "BPF map fill",
                        "timeseries",
                        "percentunit",
                        _q("max by (instance, map) (infersight_bpf_map_fill_ratio)", f"{node} {{{{map}}}}"),
                        description="Entries over max_entries; near 1 means new connections are not tracked.",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Cost",
                (
                    _panel(
                        d,
                        "Agent CPU",
                        "timeseries",
                        "percentunit",
                        _q(
                            f"sum by (instance) (rate(process_cpu_seconds_total[{RATE}]) {AGENT_ONLY})",
                            "{{instance}}",
                        ),
                    ),
                    _panel(
                        d,
                        "Agent RSS",
                        "timeseries",
                        "bytes",
                        _q(f"sum by (instance) (process_resident_memory_bytes {AGENT_ONLY})", "{{instance}}"),
                    ),
                ),
            ),
        ),
    )


DASHBOARDS: tuple[Callable[[], Dashboard], ...] = (llm_serving, gpu, request_gpu, agent_health)


def all_dashboards() -> list[Dashboard]:
    return [make() for make in DASHBOARDS]


def all_queries() -> list[Query]:
    """Every panel query of every dashboard, in dashboard order."""
    return [q for d in all_dashboards() for row in d.rows for p in row.panels for q in p.queries]


# ---------------------------------------------------------------------------------------------------
# Grafana JSON


def _datasource() -> dash_m.DataSourceRef:
    return dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _variables() -> list[Any]:
    ds = _datasource()

    def label_variable(name: str, label: str, query: str) -> dash_b.QueryVariable:
        return (
            dash_b.QueryVariable(name)
            .label(label)
            .datasource(ds)
            .query(query)
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )

    return [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        # Both request counters, so that a pod serving only gRPC can be picked too.
        label_variable(
            "namespace",
            "Namespace",
            f"label_values({{{REQUEST_COUNTERS}}}, k8s_namespace_name)",
        ),
        label_variable(
            "pod",
            "Pod",
            f'label_values({{{REQUEST_COUNTERS},k8s_namespace_name=~"$namespace"}}, k8s_pod_name)',
        ),
        label_variable(
            "model",
            "Model",
            "label_values(gen_ai_server_request_duration_seconds_count"
            '{k8s_namespace_name=~"$namespace",k8s_pod_name=~"$pod"}, gen_ai_request_model)',
        ),
    ]


def _target(q: Query) -> prom_b.Dataquery:
    t = prom_b.Dataquery().ref_id(q.ref_id).expr(q.expr).datasource(_datasource())
    if q.legend:
        t = t.legend_format(q.legend)
    if q.heatmap:
        t = t.format(prom_m.PromQueryFormat.HEATMAP)
    if q.exemplar:
        t = t.exemplar(True)
    return t


def _grafana_panel(p: Panel, panel_id: int) -> Any:
    b: Any
    if p.kind == "heatmap":
        b = (
            heatmap_b.Panel()
            .calculate(False)
            .y_axis(heatmap_b.YAxisConfig().unit(p.unit))
            .cell_values(heatmap_b.CellValues().unit("short"))
            .exemplars_color("rgba(255,0,255,0.7)")
        )
    elif p.kind == "stat":
        b = stat_b.Panel().unit(p.unit)
    elif p.kind == "timeseries":
        b = (
            ts_b.Panel()
            .unit(p.unit)
            .fill_opacity(10)
            .legend(
                common_b.VizLegendOptions()
                .show_legend(True)
                .display_mode(common_m.LegendDisplayMode.TABLE)
                .placement(common_m.LegendPlacement.BOTTOM)
                .calcs(["mean", "max"])
            )
            .tooltip(
                common_b.VizTooltipOptions()
                .mode(common_m.TooltipDisplayMode.MULTI)
                .sort(common_m.SortOrder.DESCENDING)
            )
        )
        if p.stacked:
            b = b.stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL))
    else:
        raise ValueError(f"unknown panel kind {p.kind!r}")
    b = b.id(panel_id).title(p.title).datasource(_datasource()).span(p.width).height(p.height)
    if p.description:
        b = b.description(p.description)
    for q in p.queries:
        b = b.with_target(_target(q))
    return b


def to_grafana(d: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana JSON (a plain dict)."""
    b = (
        dash_b.Dashboard(d.title)
        .uid(d.uid)
        .description(d.description)
        .tags(["infersight", "llm", "gpu"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .variables(_variables())
        .link(
            dash_b.DashboardLink("infersight")
            .type(dash_m.DashboardLinkType.DASHBOARDS)
            .tags(["infersight"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    panel_id = 1
    for row in d.rows:
        b = b.with_row(dash_b.Row(row.title).id(panel_id))
        panel_id += 1
        for p in row.panels:
            b = b.with_panel(_grafana_panel(p, panel_id))
            panel_id += 1
    result: dict[str, Any] = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    return result


def render(d: Dashboard) -> str:
    """The committed text of one dashboard: stable key order, trailing newline."""
    return json.dumps(to_grafana(d), indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {d.filename: render(d) for d in all_dashboards()}


def iter_stale(dirs: tuple[Path, ...] = OUTPUT_DIRS) -> Iterator[Path]:
    """Files in ``dirs`` that differ from a fresh build (missing ones included)."""
    for name, text in rendered().items():
        for out in dirs:
            path = out / name
            if not path.exists() or path.read_text() != text:
                yield path


def write(dirs: tuple[Path, ...] = OUTPUT_DIRS) -> list[Path]:
    """Write every dashboard into each of ``dirs``; returns the files written."""
    written = []
    for name, text in rendered().items():
        for out in dirs:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args(argv)
    if args.check:
        stale = list(iter_stale())
        for path in stale:
            print(f"stale: {path.relative_to(REPO)}", file=sys.stderr)
        return 1 if stale else 0
    for path in write():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
