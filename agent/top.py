"""``infersight top``: a live view of the agent's Prometheus endpoint.

Reads ``--url`` (default ``http://127.0.0.1:9464/metrics``) every
``--interval`` seconds and shows, per model and per pod: requests (total and
per second), p50/p99 request duration, p50/p99 time to first token, output
tokens per second, in-flight requests and aborts; gRPC calls per pod and
method (total, per second, p50/p99 duration, errors and status codes); GPU
utilisation and memory beside them when a GPU collector exports them; and the
agent's own drops and failures. ``--once`` prints one frame and exits.

gRPC calls (Triton / KServe v2 ``ModelInfer``, ``ModelStreamInfer``) are counted
in ``rpc_server_duration_milliseconds``, never in the HTTP histogram, so the
per-pod rows (HTTP requests) leave them out and the gRPC table shows them; the
per-model rows include those that name a model (the ``gen_ai`` histograms do).

Rates and windowed quantiles come from the difference between two scrapes; the
first frame (and ``--once``) shows totals and quantiles since the agent started.

Parsing is defensive: an unreachable endpoint or a malformed exposition is a
message on screen, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
REQ = "gen_ai_server_request_duration_seconds"
HTTP = "http_server_request_duration_seconds"
# rpc.server.duration: in milliseconds (semconv RPC metrics up to v1.37); parse() converts to seconds.
RPC = "rpc_server_duration_milliseconds"
TTFT = "gen_ai_server_time_to_first_token_seconds"
TOKENS = "gen_ai_server_token_usage"
ACTIVE = "http_server_active_requests"
ABORTED = "infersight_requests_aborted"
# Self-metric names that mean data was lost or a feature failed.
_TROUBLE = ("lost", "drop", "fail", "error", "folded", "refused", "overflow", "truncat")


@dataclass
class Hist:
    """A cumulative histogram: bucket upper bound -> cumulative count, plus sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum: float = 0.0

    def minus(self, older: Hist | None) -> Hist:
        if older is None:
            return self
        return Hist(
            {le: c - older.buckets.get(le, 0.0) for le, c in self.buckets.items()},
            self.count - older.count,
            self.sum - older.sum,
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as PromQL's ``histogram_quantile``."""
        if self.count <= 0 or not self.buckets:
            return None
        les = sorted(self.buckets)
        total = self.buckets[les[-1]]
        if total <= 0:
            return None
        rank = q * total
        prev_le, prev_c = 0.0, 0.0
        for le in les:
            c = self.buckets[le]
            if c >= rank:
                if math.isinf(le):
                    return prev_le  # as PromQL: the highest finite bound
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le


@dataclass
class Snapshot:
    """What one scrape says, keyed by row (("model", name) or ("pod", name))."""

    at: float
    requests: dict[tuple[str, str], Hist] = field(default_factory=dict)
    ttft: dict[tuple[str, str], Hist] = field(default_factory=dict)
    output_tokens: dict[tuple[str, str], float] = field(default_factory=dict)
    active: dict[tuple[str, str], float] = field(default_factory=dict)
    aborted: dict[tuple[str, str], float] = field(default_factory=dict)
    # gRPC calls keyed by (pod or "", "Service/Method"); durations in seconds.
    rpc: dict[tuple[str, str], Hist] = field(default_factory=dict)
    rpc_errors: dict[tuple[str, str], float] = field(default_factory=dict)
    rpc_codes: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    gpu: dict[str, dict[str, float]] = field(default_factory=dict)  # gpu id -> {"util": .., "mem": ..}
    trouble: dict[str, float] = field(default_factory=dict)


def _rows(labels: Mapping[str, str], model: bool = True, pod: bool = True) -> Iterable[tuple[str, str]]:
    name = labels.get("gen_ai_request_model")
    if model and name:
        yield ("model", name)
    pod_name = labels.get("k8s_pod_name")
    if pod and pod_name:
        ns = labels.get("k8s_namespace_name")
        yield ("pod", f"{ns}/{pod_name}" if ns else pod_name)


def _rpc_key(labels: Mapping[str, str]) -> tuple[str, str]:
    """(pod or "", "Service/Method"), the service without its package (``GRPCInferenceService``)."""
    pod = labels.get("k8s_pod_name", "")
    ns = labels.get("k8s_namespace_name")
    service = labels.get("rpc_service", "").rsplit(".", 1)[-1]
    method = labels.get("rpc_method") or "?"
    return (f"{ns}/{pod}" if ns and pod else pod, f"{service}/{method}" if service else method)


def _hist_add(
    table: dict[tuple[str, str], Hist],
    key: tuple[str, str],
    name: str,
    labels: Mapping[str, str],
    value: float,
    scale: float = 1.0,
) -> None:
    """Add one histogram sample; ``scale`` converts the observed unit (bounds and sum) to seconds."""
    h = table.setdefault(key, Hist())
    if name.endswith("_bucket"):
        try:
            le = float(labels.get("le", "nan")) * scale
        except ValueError:
            return
        if not math.isnan(le):
            h.buckets[le] = h.buckets.get(le, 0.0) + value
    elif name.endswith("_count"):
        h.count += value
    elif name.endswith("_sum"):
        h.sum += value * scale


def parse(text: str, at: float | None = None) -> Snapshot:
    """A :class:`Snapshot` of a Prometheus text exposition. Raises ValueError on unparseable text."""
    snap = Snapshot(at if at is not None else time.monotonic())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            value = float(s.value)
            if math.isnan(value):
                continue
            name = s.name
            if fam.name == REQ:
                # Model rows count LLM requests; pod rows count every HTTP request (below).
                for key in _rows(labels, pod=False):
                    _hist_add(snap.requests, key, name, labels, value)
            elif fam.name == HTTP:
                for key in _rows(labels, model=False):
                    _hist_add(snap.requests, key, name, labels, value)
            elif fam.name == RPC:
                key = _rpc_key(labels)
                _hist_add(snap.rpc, key, name, labels, value, scale=1e-3)
                if name.endswith("_count"):
                    if labels.get("error_type"):
                        snap.rpc_errors[key] = snap.rpc_errors.get(key, 0.0) + value
                    codes = snap.rpc_codes.setdefault(key, {})
                    code = labels.get("rpc_grpc_status_code", "-")  # absent: no trailers (a reset)
                    codes[code] = codes.get(code, 0.0) + value
            elif fam.name == TTFT:
                for key in _rows(labels):
                    _hist_add(snap.ttft, key, name, labels, value)
            elif fam.name == TOKENS and name.endswith("_sum") and labels.get("gen_ai_token_type") == "output":
                for key in _rows(labels):
                    snap.output_tokens[key] = snap.output_tokens.get(key, 0.0) + value
            elif fam.name == ACTIVE:
                for key in _rows(labels):
                    snap.active[key] = snap.active.get(key, 0.0) + value
            elif fam.name == ABORTED and name.endswith("_total"):
                for key in _rows(labels):
                    snap.aborted[key] = snap.aborted.get(key, 0.0) + value
            elif "gpu" in name.lower() or name.startswith("DCGM_FI_DEV"):
                _gpu(snap, name, labels, value)
            elif name.startswith("infersight_") and any(t in name for t in _TROUBLE) and value:
                counter = name + _label_suffix(labels)
                snap.trouble[counter] = snap.trouble.get(counter, 0.0) + value
    return snap


def _gpu(snap: Snapshot, name: str, labels: Mapping[str, str], value: float) -> None:
    gpu = labels.get("gpu_uuid") or labels.get("UUID") or labels.get("gpu") or labels.get("gpu_index")
    if not gpu:
        return
    pod = labels.get("k8s_pod_name") or labels.get("pod")
    key = f"{gpu} ({pod})" if pod else gpu
    low = name.lower()
    slot = snap.gpu.setdefault(key, {})
    if "util" in low or low.endswith("gpu_util"):
        # Ratios (0..1) and percentages (0..100) both occur in the wild.
        slot["util"] = value * 100 if "ratio" in low and value <= 1 else value
    elif ("memory" in low or "fb_used" in low) and ("used" in low or "usage" in low):
        slot["mem"] = value / 2**20 if "bytes" in low else value


def _label_suffix(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else ""


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 0.01:  # gRPC calls to classic models take a few ms
        return f"{v * 1000:.1f} ms"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fmt_codes(codes: Mapping[str, float]) -> str:
    """``0:120 5:3``: calls per gRPC status code, numerically, ``-`` (no status) last."""
    order = sorted(codes, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    return " ".join(f"{c}:{codes[c]:.0f}" for c in order if codes[c]) or "-"


def _windowed(
    now: Mapping[tuple[str, str], Hist], before: Mapping[tuple[str, str], Hist] | None, key: tuple[str, str]
) -> tuple[Hist, Hist]:
    """(total since start, the part since ``before``; the total again without an earlier scrape)."""
    total = now.get(key, Hist())
    old = before.get(key) if before is not None else None
    return total, (total.minus(old) if old is not None else total)


def _rpc_table(now: Snapshot, before: Snapshot | None, dt: float) -> Table | None:
    if not now.rpc:
        return None
    t = Table(title="gRPC calls", title_justify="left", expand=False)
    for col in ("pod", "rpc", "calls", "calls/s", "p50", "p99", "errors", "status codes"):
        t.add_column(col, justify="left" if col in ("pod", "rpc", "status codes") else "right")
    for key in sorted(now.rpc):
        total, window = _windowed(now.rpc, before.rpc if before is not None and dt > 0 else None, key)
        rate = window.count / dt if before is not None and dt > 0 else None
        t.add_row(
            key[0] or "-",
            key[1],
            f"{total.count:.0f}",
            _fmt_rate(rate),
            _fmt_s(window.quantile(0.5)),
            _fmt_s(window.quantile(0.99)),
            f"{now.rpc_errors.get(key, 0.0):.0f}",
            _fmt_codes(now.rpc_codes.get(key, {})),
        )
    return t


def render(now: Snapshot, before: Snapshot | None = None, source: str = DEFAULT_URL) -> Group:
    """The frame for ``now``; with ``before``, rates and quantiles cover the interval between them."""
    dt = (now.at - before.at) if before is not None else 0.0
    parts: list[Any] = []
    for kind, title in (("model", "Per model"), ("pod", "Per pod")):
        keys = sorted({k for k in (*now.requests, *now.active) if k[0] == kind})
        if not keys:
            continue
        t = Table(title=title, title_justify="left", expand=False)
        for col in ("model" if kind == "model" else "pod", "requests", "req/s", "p50", "p99", "TTFT p50",
                    "TTFT p99", "tok/s", "in-flight", "aborted"):  # fmt: skip
            t.add_column(col, justify="left" if col in ("model", "pod") else "right")
        for key in keys:
            total = now.requests.get(key, Hist())
            old = before.requests.get(key) if before else None
            window = total.minus(old) if old is not None and dt > 0 else total
            ttft_all = now.ttft.get(key, Hist())
            ttft_old = before.ttft.get(key) if before else None
            ttft = ttft_all.minus(ttft_old) if ttft_old is not None and dt > 0 else ttft_all
            rps = (window.count / dt) if before is not None and dt > 0 else None
            tok = now.output_tokens.get(key)
            tok_old = before.output_tokens.get(key, 0.0) if before else None
            tps = (tok - tok_old) / dt if tok is not None and tok_old is not None and dt > 0 else None
            t.add_row(
                key[1] or "(none)",
                f"{total.count:.0f}",
                _fmt_rate(rps),
                _fmt_s(window.quantile(0.5)),
                _fmt_s(window.quantile(0.99)),
                _fmt_s(ttft.quantile(0.5)),
                _fmt_s(ttft.quantile(0.99)),
                _fmt_rate(tps),
                f"{now.active.get(key, 0.0):.0f}",
                f"{now.aborted.get(key, 0.0):.0f}",
            )
        parts.append(t)
    rpc = _rpc_table(now, before, dt)
    if rpc is not None:
        parts.append(rpc)
    if now.gpu:
        g = Table(title="GPUs", title_justify="left")
        g.add_column("gpu")
        g.add_column("util %", justify="right")
        g.add_column("memory MiB", justify="right")
        for gpu, gv in sorted(now.gpu.items()):
            g.add_row(gpu, _fmt_rate(gv.get("util")), _fmt_rate(gv.get("mem")))
        parts.append(g)
    if not parts:
        parts.append(Text("no requests seen yet", style="dim"))
    if now.trouble:
        a = Table(title="Agent drops and failures", title_justify="left")
        a.add_column("counter")
        a.add_column("value", justify="right")
        for counter, n in sorted(now.trouble.items()):
            a.add_row(counter, f"{n:.0f}")
        parts.append(a)
    else:
        parts.append(Text("agent: no drops or failures", style="green"))
    parts.append(Text(f"source: {source}", style="dim"))
    return Group(*parts)


def fetch(url: str, timeout: float = 5.0) -> str:
    req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode("utf-8", errors="replace"))


def scrape(url: str) -> tuple[Snapshot | None, str | None]:
    """``(snapshot, None)`` or ``(None, error message)``; never raises."""
    try:
        text = fetch(url)
    except (OSError, ValueError) as exc:
        return None, f"cannot read {url}: {exc}"
    try:
        return parse(text), None
    except Exception as exc:  # the parser raises assorted errors on foreign text
        return None, f"cannot parse {url}: {exc!r}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``infersight top``. Returns 0, or 1 when ``--once`` could not read the endpoint."""
    p = argparse.ArgumentParser(prog="infersight top", description="Live view of an infersight agent.")
    p.add_argument("--url", default=DEFAULT_URL, help="the agent's Prometheus endpoint")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    args = p.parse_args(argv)
    console = Console()
    if args.once:
        snap, err = scrape(args.url)
        if snap is None:
            console.print(Text(err or "no data", style="red"))
            return 1
        console.print(render(snap, None, args.url))
        return 0
    before: Snapshot | None = None
    with Live(Text("connecting..."), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                snap, err = scrape(args.url)
                if snap is None:
                    live.update(Text(err or "no data", style="red"))
                else:
                    live.update(render(snap, before, args.url))
                    before = snap
                time.sleep(max(0.2, args.interval))
        except KeyboardInterrupt:
            pass
    return 0
