"""Label bounds (route templating, method folding, caps) and trace sampling."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.export.exporters import ExportConfig, Exporters
from agent.export.instruments import HistogramPoint
from agent.export.routes import (
    K8S_LABEL_KEYS,
    MAX_VALUE_LEN,
    ROUTE_MEMO_SIZE,
    AttributeBounds,
    BoundsConfig,
    bound_method,
    point_labels,
    template_route,
)
from agent.export.sampling import Sampler
from agent.selfmetrics import SelfMetrics
from tests.test_export_canary import make_request


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions?stream=true&api-key=secret", "/v1/chat/completions"),
        ("/v2/models/llama-3-8b/infer", "/v2/models/{model}/infer"),
        ("/v2/models/llama/versions/3/infer", "/v2/models/{model}/versions/{version}/infer"),
        ("/v2/models/llama/versions/2024-01/ready", "/v2/models/{model}/versions/{version}/ready"),
        ("/v2/models/llama/generate_stream", "/v2/models/{model}/generate_stream"),
        ("/v2/models/llama", "/v2/models/{model}"),
        ("/v2/models", "/v2/models"),
        ("/v1/models/gpt2", "/v1/models/gpt2"),
        ("/api/users/12345/orders/9", "/api/users/{id}/orders/{id}"),
        ("/v1/files/3fa85f64-5717-4562-b3fc-2c963f66afa6", "/v1/files/{id}"),
        ("/v1/blobs/deadbeef01", "/v1/blobs/{id}"),
        ("/v1/responses/resp_67ccd2bed1ec8190b14f964abc054267", "/v1/responses/{id}"),
        ("/v1/chat/completions/chatcmpl-9fq2XbT1kLm0aZ3", "/v1/chat/completions/{id}"),
        ("/health", "/health"),
        ("/", "/"),
        ("", ""),
        (None, ""),
        ("http://proxy.example/v1/completions?x=1", "/v1/completions"),
        ("/a/b/c/d/e/f/g/h/i/j", "/a/b/c/d/e/f/g/h/{...}"),
        ("/generate#frag", "/generate"),
    ],
)
def test_route_templates(path: str | None, route: str) -> None:
    assert template_route(path) == route


@given(st.text(max_size=300))
def test_templating_never_raises_and_drops_queries(path: str) -> None:
    route = template_route(path)
    assert "?" not in route and "#" not in route
    assert route == "" or route.startswith("/")
    assert route.count("/") <= 9


def test_methods_fold_to_other() -> None:
    assert bound_method("get") == ("GET", False)
    assert bound_method("PATCH") == ("PATCH", False)
    assert bound_method("BREW") == ("_OTHER", True)
    assert bound_method(None) == ("", False)


def test_caps_fold_to_other_and_count() -> None:
    m = SelfMetrics()
    b = AttributeBounds(BoundsConfig(model_cap=2, route_cap=2, k8s_cap=1), m)
    assert [b.model(x) for x in ["a", "b", "c", "a", "d"]] == ["a", "b", "other", "a", "other"]
    assert b.route("/x") == "/x" and b.route("/y/1") == "/y/{id}" and b.route("/z") == "other"
    assert b.route("/y/2") == "/y/{id}"  # same template, no new value
    assert b.k8s({"k8s.pod.name": "p1"})["k8s.pod.name"] == "p1"
    assert b.k8s({"k8s.pod.name": "p2"})["k8s.pod.name"] == "other"
    assert b.model("m" * (MAX_VALUE_LEN + 1)) == "other"
    assert b.method("BREW") == "_OTHER"
    folded = {s.labels: s.value for s in m.snapshot() if s.name == "infersight.attributes.folded"}
    assert folded[(("attribute", "gen_ai.request.model"), ("reason", "cap"))] == 2
    assert folded[(("attribute", "gen_ai.request.model"), ("reason", "too_long"))] == 1
    assert folded[(("attribute", "http.route"), ("reason", "cap"))] == 1
    assert folded[(("attribute", "k8s.pod.name"), ("reason", "cap"))] == 1
    assert folded[(("attribute", "http.request.method"), ("reason", "unknown"))] == 1


def test_k8s_values_are_the_k8s_labels_in_key_order() -> None:
    # the instruments key series on k8s_values, the labels of point metrics on k8s: one
    # capping for both, values in K8S_LABEL_KEYS order, folds counted once per value
    assert K8S_LABEL_KEYS == ("k8s.namespace.name", "k8s.pod.name", "k8s.container.name",
                              "k8s.deployment.name", "k8s.statefulset.name", "k8s.node.name")
    cases = [
        ({}, ("", "", "", "", "", "")),
        ({"process.pid": 7}, ("", "", "", "", "", "")),
        ({"k8s.pod.name": "p1", "k8s.namespace.name": "ns", "k8s.node.name": ""}, ("ns", "p1", "", "", "", "")),
        ({"k8s.pod.name": "p2", "k8s.container.name": None, "k8s.deployment.name": "d" * (MAX_VALUE_LEN + 1)},
         ("", "other", "", "other", "", "")),
        ({"k8s.pod.name": "p1", "k8s.statefulset.name": 5}, ("", "p1", "", "", "5", "")),
    ]
    m = SelfMetrics()
    b = AttributeBounds(BoundsConfig(k8s_cap=1), m)
    assert [b.k8s_values(attributes) for attributes, _ in cases] == [want for _, want in cases]
    assert [b.k8s(attributes) for attributes, _ in cases] == [dict(zip(K8S_LABEL_KEYS, want, strict=True)) for _, want in cases]
    assert {(s.labels, s.value) for s in m.snapshot() if s.name == "infersight.attributes.folded"} == {
        ((("attribute", "k8s.deployment.name"), ("reason", "too_long")), 2.0),
        ((("attribute", "k8s.pod.name"), ("reason", "cap")), 2.0),
    }


def test_point_labels_drop_pid_and_bound_values() -> None:
    b = AttributeBounds(BoundsConfig(k8s_cap=1), SelfMetrics())
    labels = point_labels({"process.pid": 7, "gpu.uuid": "G", "k8s.pod.name": "p", "x": "v" * 1000}, b)
    assert labels == (("gpu.uuid", "G"), ("k8s.pod.name", "p"), ("x", "other"))


def test_a_million_distinct_paths_and_models_stay_bounded() -> None:
    # FIELD-NOTES 6: 10^6 distinct paths or model names. Scaled to 20k to stay cheap on shared cores;
    # the bound, not the count, is what is tested.
    m = SelfMetrics()
    ex = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0, model_cap=8, route_cap=16), metrics=m)
    try:
        for i in range(20_000):
            ex.emit(make_request(path=f"/v1/x{i:x}y/completions", request_model=f"model-{i}"))
        sizes = ex.bounds.sizes()
        assert sizes["http.route"] == 16 and sizes["gen_ai.request.model"] == 8
        series = next(s for s in ex.state.collect() if s.instrument.name == "gen_ai.server.request.duration")
        assert len(series.points) <= 8 + 1
        assert sum(p.count for p in series.points if isinstance(p, HistogramPoint)) == 20_000
        # the raw path -> template memo started again at every ROUTE_MEMO_SIZE paths, counted
        resets = (20_000 - 1) // ROUTE_MEMO_SIZE
        assert m.get("infersight.cache.evictions", (("cache", "route_template"),)) == resets * ROUTE_MEMO_SIZE
        # and still gives each path its template after a reset
        assert ex.bounds.route("/v1/x0y/completions") == "/v1/x0y/completions"  # admitted first
        assert ex.bounds.route("/v1/x64y/completions") == "other"  # past the cap of 16
        b = AttributeBounds(BoundsConfig(route_cap=4), SelfMetrics())
        for i in range(ROUTE_MEMO_SIZE + 1):
            b.route(f"/files/{i}")
        assert b.route("/files/0") == "/files/{id}" and b.route("/v1/models") == "/v1/models"
    finally:
        ex.shutdown()


def test_series_cap_folds_whole_label_sets() -> None:
    m = SelfMetrics()
    ex = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0, max_series=3), metrics=m)
    try:
        for i in range(10):
            ex.emit(make_request(status_code=200 + i, operation=None, request_model=None))
        (snap,) = [s for s in ex.state.collect() if s.instrument.name == "http.server.request.duration"]
        assert len(snap.points) == 4
        assert sum(p.count for p in snap.points if isinstance(p, HistogramPoint)) == 10
        assert (
            m.get(
                "infersight.attributes.folded",
                (("attribute", "http.server.request.duration"), ("reason", "series_cap")),
            )
            == 7
        )
    finally:
        ex.shutdown()


def test_sampling_keeps_errors_aborts_and_slow_requests() -> None:
    m = SelfMetrics()
    s = Sampler(ratio=0.0, slow_threshold_s=10.0, metrics=m)
    assert not s.decide(make_request(), 1).keep
    assert s.decide(make_request(status_code=502), 1).reason == "error"
    assert s.decide(make_request(error_type="response_incomplete"), 1).reason == "error"
    assert s.decide(make_request(aborted=True), 1).reason == "aborted"
    assert s.decide(make_request(duration_s=12.0), 1).reason == "slow"
    assert m.get("infersight.traces.sampled", (("decision", "drop"), ("reason", "ratio"))) == 1
    with pytest.raises(ValueError):
        Sampler(ratio=1.5)


def test_ratio_sampling_follows_the_trace_id_and_the_ratio() -> None:
    s = Sampler(ratio=0.25, metrics=SelfMetrics(), rng=random.Random(7))
    r = make_request(trace_id="0af7651916cd43dd8448eb211c80319c")
    # Deterministic on the client's trace id: every agent on the path decides alike.
    low, high = 0x0000000000000000_0000000000000001, 0x0000000000000000_FFFFFFFFFFFFFFFF
    assert s.decide(r, low).keep and not s.decide(r, high).keep
    kept = sum(s.decide(make_request(), 0).keep for _ in range(4000))
    assert 800 < kept < 1200
