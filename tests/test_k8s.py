"""PodIndex against a fake API server, through the real ``kubernetes`` client over HTTP."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agent.selfmetrics import SelfMetrics
from collectors.cgroup import PidResolver
from collectors.k8s import UP, UP_LABELS, K8sConfig, PodIndex, StaticPodIndex, pod_attributes_for_pid
from tests.fakes.fake_apiserver import FakeApiServer, make_pod, make_replicaset


def cid() -> str:
    return secrets.token_hex(32)


def uid() -> str:
    return str(uuid.uuid4())


def wait_until(predicate: Callable[[], object], timeout: float = 15.0) -> bool:
    """Poll until ``predicate()`` is true; a failed wait fails the assertion that uses it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


Factory = Callable[..., tuple[PodIndex, SelfMetrics]]


@pytest.fixture
def make_index(api: FakeApiServer) -> Iterator[Factory]:
    started: list[PodIndex] = []

    def factory(*, clock: Callable[[], float] = time.monotonic, **overrides: Any) -> tuple[PodIndex, SelfMetrics]:
        settings: dict[str, Any] = {
            "node_name": "node-a",
            "api_url": api.url,
            "watch_timeout_s": 5,
            "request_timeout_s": 3.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.4,
        }
        settings.update(overrides)
        metrics = SelfMetrics()
        index = PodIndex(K8sConfig(**settings), metrics=metrics, clock=clock)
        started.append(index)
        index.start()
        return index, metrics

    yield factory
    for index in started:
        index.stop()


def test_fixture_objects_are_valid_kubernetes(api: FakeApiServer) -> None:
    docs = [
        make_pod("a", uid=uid(), containers={"app": cid(), "init": None}, owner=("apps/v1", "ReplicaSet", "a-5d8f"),
                 labels={"app": "a", "pod-template-hash": "5d8f"}, previous={"app": cid()}),
        make_pod("b", namespace="ml", node="node-b", uid=uid(), containers={"srv": cid()}, runtime="cri-o"),
        make_replicaset("a-5d8f", deployment="a", template_hash="5d8f"),
        make_replicaset("orphan-1", deployment=None, template_hash="1"),
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.35.0", strict=True)
    # What the server streams (with its resourceVersion) is valid too.
    api.put_pod(docs[0])
    stored = api._pods[("default", "a")]
    kubernetes_validate.validate(stored, "1.35.0", strict=True)
    # And the validator is strict: an unknown field is rejected.
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**docs[0], "spec": {**docs[0]["spec"], "gpus": 1}}, "1.35.0", strict=True)


def test_lists_only_this_node_and_resolves_containers(api: FakeApiServer, make_index: Factory) -> None:
    mine, theirs = cid(), cid()
    mine_uid, theirs_uid = uid(), uid()
    api.put_pod(make_pod("vllm-0", namespace="ml", uid=mine_uid, containers={"vllm": mine},
                         owner=("apps/v1", "StatefulSet", "vllm"), labels={"app": "vllm"}))
    api.put_pod(make_pod("other-0", namespace="ml", node="node-b", uid=theirs_uid, containers={"vllm": theirs}))
    index, metrics = make_index()
    assert wait_until(lambda: index.synced)
    pod = index.by_container(mine)
    assert pod is not None
    assert pod.attributes(mine) == {
        "k8s.namespace.name": "ml",
        "k8s.pod.name": "vllm-0",
        "k8s.pod.uid": mine_uid,
        "k8s.container.name": "vllm",
        "k8s.node.name": "node-a",
        "k8s.statefulset.name": "vllm",
    }
    assert pod.labels == {"app": "vllm"}
    assert index.by_container(f"containerd://{mine}") == pod
    assert index.by_uid(mine_uid) == pod
    assert index.by_container(theirs) is None
    assert index.by_uid(theirs_uid) is None
    assert metrics.get(UP, UP_LABELS) == 1
    # A pod of another node added while watching never shows up either.
    late = cid()
    api.put_pod(make_pod("other-1", node="node-b", uid=uid(), containers={"c": late}))
    marker = cid()
    api.put_pod(make_pod("marker", uid=uid(), containers={"c": marker}))
    assert wait_until(lambda: index.by_container(marker) is not None)
    assert index.by_container(late) is None
    # Every pod request was node-scoped: nothing cluster-wide, ever.
    pod_requests = api.pod_lists() + api.pod_watches()
    assert pod_requests
    assert all(r.query.get("fieldSelector") == "spec.nodeName=node-a" for r in pod_requests)
    assert all(r.query.get("timeoutSeconds") == "5" for r in api.pod_watches())


def test_watch_applies_add_modify_restart_delete(api: FakeApiServer, make_index: Factory) -> None:
    index, _ = make_index()
    assert wait_until(lambda: index.synced)
    pod_uid = uid()
    pod = make_pod("llm", uid=pod_uid, containers={"server": None})
    api.put_pod(pod)  # ADDED, container not started yet
    assert wait_until(lambda: index.by_uid(pod_uid) is not None)
    assert index.by_uid(pod_uid).containers == {}  # type: ignore[union-attr]
    first = cid()
    api.put_pod(make_pod("llm", uid=pod_uid, containers={"server": first}))  # MODIFIED: started
    assert wait_until(lambda: index.by_container(first) is not None)
    second = cid()
    api.put_pod(make_pod("llm", uid=pod_uid, containers={"server": second}, previous={"server": first}))  # restarted
    assert wait_until(lambda: index.by_container(second) is not None)
    assert index.by_container(first) is not None  # the old instance's late records still resolve
    assert index.by_container(second).attributes(second)["k8s.container.name"] == "server"  # type: ignore[union-attr]
    api.delete_pod("default", "llm")  # DELETED
    assert wait_until(lambda: len(index) == 0)
    gone = index.by_container(second)
    assert gone is not None and gone.name == "llm"  # still resolvable for a while
    assert index.by_uid(pod_uid) is not None
    assert len(api.pod_lists()) == 1  # all of that came from the watch, not from relisting


def test_owner_resolution(api: FakeApiServer, make_index: Factory) -> None:
    api.put_replicaset(make_replicaset("web-6b9f7c", deployment="web", template_hash="6b9f7c"))
    api.put_replicaset(make_replicaset("bare-55d", deployment=None, template_hash="55d"))
    ids = {name: cid() for name in ("web1", "web2", "bare", "gone", "ds", "job", "none")}
    rs = ("apps/v1", "ReplicaSet")
    api.put_pod(make_pod("web-6b9f7c-aaaaa", uid=uid(), containers={"c": ids["web1"]}, owner=(*rs, "web-6b9f7c"),
                         labels={"pod-template-hash": "6b9f7c"}))
    api.put_pod(make_pod("web-6b9f7c-bbbbb", uid=uid(), containers={"c": ids["web2"]}, owner=(*rs, "web-6b9f7c"),
                         labels={"pod-template-hash": "6b9f7c"}))
    api.put_pod(make_pod("bare-55d-x", uid=uid(), containers={"c": ids["bare"]}, owner=(*rs, "bare-55d"),
                         labels={"pod-template-hash": "55d"}))
    # The ReplicaSet is not (or no longer) readable: the Deployment naming rule answers.
    api.put_pod(make_pod("api-7c6d5-x", uid=uid(), containers={"c": ids["gone"]}, owner=(*rs, "api-7c6d5"),
                         labels={"pod-template-hash": "7c6d5"}))
    api.put_pod(make_pod("dcgm-x", uid=uid(), containers={"c": ids["ds"]}, owner=("apps/v1", "DaemonSet", "dcgm")))
    api.put_pod(make_pod("bench-x", uid=uid(), containers={"c": ids["job"]}, owner=("batch/v1", "Job", "bench")))
    api.put_pod(make_pod("lonely", uid=uid(), containers={"c": ids["none"]}))
    index, metrics = make_index()
    assert wait_until(lambda: index.synced)

    def attrs(key: str) -> dict[str, str]:
        pod = index.by_container(ids[key])
        assert pod is not None
        return {k: v for k, v in pod.attributes(ids[key]).items() if k not in ("k8s.pod.uid",)}

    assert attrs("web1")["k8s.deployment.name"] == "web"
    assert attrs("web2")["k8s.deployment.name"] == "web"
    assert attrs("bare")["k8s.replicaset.name"] == "bare-55d" and "k8s.deployment.name" not in attrs("bare")
    assert attrs("gone")["k8s.deployment.name"] == "api"
    assert attrs("ds")["k8s.daemonset.name"] == "dcgm"
    assert attrs("job")["k8s.job.name"] == "bench"
    assert not any(k.endswith((".deployment.name", ".replicaset.name", ".job.name")) for k in attrs("none"))
    rs_gets = [r for r in api.requests() if "/replicasets/" in r.path]
    # One GET per ReplicaSet (cached): web-6b9f7c once though it has two pods.
    assert sorted(r.path.rsplit("/", 1)[1] for r in rs_gets) == ["api-7c6d5", "bare-55d", "web-6b9f7c"]
    assert all(r.path.startswith("/apis/apps/v1/namespaces/default/") for r in rs_gets)
    assert metrics.get("infersight.k8s.api.errors", (("reason", "replicaset_http_404"),)) == 1


def test_expired_version_relists_and_catches_up(api: FakeApiServer, make_index: Factory) -> None:
    keep, drop, new = cid(), cid(), cid()
    api.put_pod(make_pod("keep", uid=uid(), containers={"c": keep}))
    api.put_pod(make_pod("drop", uid=uid(), containers={"c": drop}))
    index, metrics = make_index()
    assert wait_until(lambda: index.synced and len(api.pod_watches()) >= 1)
    with api.frozen():  # the watch does not see these; only a relist can
        api.delete_pod("default", "drop")
        api.put_pod(make_pod("new", uid=uid(), containers={"c": new}))
        api.expire()  # open watch gets ERROR 410
        assert wait_until(lambda: index.by_container(new) is not None)
    assert len(api.pod_lists()) == 2
    assert metrics.get("infersight.k8s.relists") == 1
    assert metrics.get("infersight.k8s.watch.restarts", (("reason", "expired"),)) == 1
    assert index.by_container(keep) is not None
    assert len(index) == 2  # keep + new; drop became a tombstone
    assert index.by_container(drop) is not None  # ...that still resolves
    # And the next watch starts from the relisted version.
    assert wait_until(lambda: len(api.pod_watches()) >= 2)
    assert int(api.pod_watches()[-1].query["resourceVersion"]) == api.resource_version


def test_http_410_on_watch_relists(api: FakeApiServer, make_index: Factory) -> None:
    index, metrics = make_index()
    assert wait_until(lambda: index.synced and len(api.pod_watches()) >= 1)
    api.fail_next_watch_http = 410
    api.disconnect_watches()
    assert wait_until(lambda: len(api.pod_lists()) == 2)
    late = cid()
    api.put_pod(make_pod("late", uid=uid(), containers={"c": late}))
    assert wait_until(lambda: index.by_container(late) is not None)
    assert metrics.get("infersight.k8s.relists") == 1


def test_disconnect_rewatches_from_last_version_without_relisting(api: FakeApiServer, make_index: Factory) -> None:
    index, metrics = make_index()
    assert wait_until(lambda: index.synced and len(api.pod_watches()) >= 1)
    first = cid()
    api.put_pod(make_pod("first", uid=uid(), containers={"c": first}))
    assert wait_until(lambda: index.by_container(first) is not None)
    seen_rv = api.resource_version
    api.disconnect_watches()
    assert wait_until(lambda: len(api.pod_watches()) >= 2)
    assert api.pod_watches()[-1].query["resourceVersion"] == str(seen_rv)
    second = cid()
    api.put_pod(make_pod("second", uid=uid(), containers={"c": second}))
    assert wait_until(lambda: index.by_container(second) is not None)
    assert len(api.pod_lists()) == 1
    assert metrics.get("infersight.k8s.watch.restarts", (("reason", "disconnect"),)) >= 1
    assert metrics.get(UP, UP_LABELS) == 1  # a dropped stream is not an outage


def test_watch_timeout_rewatches(api: FakeApiServer, make_index: Factory) -> None:
    index, metrics = make_index(watch_timeout_s=1)
    assert wait_until(lambda: len(api.pod_watches()) >= 2)
    assert metrics.get("infersight.k8s.watch.restarts", (("reason", "timeout"),)) >= 1
    assert len(api.pod_lists()) == 1
    added = cid()
    api.put_pod(make_pod("after-timeout", uid=uid(), containers={"c": added}))
    assert wait_until(lambda: index.by_container(added) is not None)


def test_deleted_pods_expire_and_are_bounded(api: FakeApiServer, make_index: Factory) -> None:
    now = [1000.0]
    ids = [cid() for _ in range(3)]
    for i, c in enumerate(ids):
        api.put_pod(make_pod(f"p{i}", uid=uid(), containers={"c": c}))
    index, metrics = make_index(clock=lambda: now[0], deleted_retention_s=60.0, max_deleted_pods=2)
    assert wait_until(lambda: len(index) == 3)
    for i in range(3):
        api.delete_pod("default", f"p{i}")
    assert wait_until(lambda: len(index) == 0)
    # Three deleted, room for two: the first one deleted is evicted (and counted).
    assert index.by_container(ids[0]) is None
    assert index.by_container(ids[1]) is not None and index.by_container(ids[2]) is not None
    assert metrics.get("infersight.cache.evictions", (("cache", "k8s_deleted_pods"),)) == 1
    now[0] += 61.0
    assert index.by_container(ids[1]) is None
    assert index.by_container(ids[2]) is None


def test_apiserver_down_at_start_then_up(api: FakeApiServer, caplog: pytest.LogCaptureFixture) -> None:
    c = cid()
    api.put_pod(make_pod("early", uid=uid(), containers={"c": c}))
    api.stop()  # the port is known and nothing listens on it
    metrics = SelfMetrics()
    index = PodIndex(
        K8sConfig(node_name="node-a", api_url=api.url, backoff_initial_s=0.05, backoff_max_s=0.2, request_timeout_s=2),
        metrics=metrics,
    )
    caplog.set_level(logging.INFO, logger="collectors.k8s")
    try:
        index.start()  # returns at once, whatever the network does
        assert wait_until(lambda: metrics.total("infersight.k8s.api.errors") >= 3)
        assert metrics.get(UP, UP_LABELS) == 0
        assert not index.up and not index.synced
        assert index.by_container(c) is None  # the agent keeps working, without k8s attributes
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "collectors.k8s"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        api.start()
        assert wait_until(lambda: index.by_container(c) is not None)
        assert metrics.get(UP, UP_LABELS) == 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        index.stop()


def test_apiserver_restart_mid_watch_resumes(api: FakeApiServer, make_index: Factory) -> None:
    index, metrics = make_index()
    assert wait_until(lambda: index.synced and len(api.pod_watches()) >= 1)
    api.stop()
    assert wait_until(lambda: metrics.get(UP, UP_LABELS) == 0)
    during = cid()
    api.put_pod(make_pod("during", uid=uid(), containers={"c": during}))  # happens while we cannot see
    assert index.by_container(during) is None
    api.start()
    assert wait_until(lambda: index.by_container(during) is not None)
    assert metrics.get(UP, UP_LABELS) == 1
    assert len(api.pod_lists()) == 1  # resumed from the last version: no relist needed


def test_without_node_name_nothing_is_requested(
    api: FakeApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    metrics = SelfMetrics()
    index = PodIndex(K8sConfig(api_url=api.url), metrics=metrics)
    index.start()
    index.stop()
    assert metrics.get(UP, UP_LABELS) == 0
    assert api.requests() == []
    assert any("no node name" in r.getMessage() for r in caplog.records)


def test_node_name_from_environment(api: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-b")
    c = cid()
    api.put_pod(make_pod("b", node="node-b", uid=uid(), containers={"c": c}))
    index = PodIndex(K8sConfig(api_url=api.url), metrics=SelfMetrics())
    index.start()
    try:
        assert wait_until(lambda: index.by_container(c) is not None)
        assert index.by_container(c).node == "node-b"  # type: ignore[union-attr]
    finally:
        index.stop()


def test_bounds_pages_pods_and_labels(api: FakeApiServer, make_index: Factory) -> None:
    ids = [cid() for _ in range(5)]
    for i, c in enumerate(ids):
        api.put_pod(make_pod(f"p{i}", uid=uid(), containers={"c": c}, labels={"a": "1", "b": "2", "c": "3"}))
    index, metrics = make_index(list_page_size=2, max_pods=4, max_labels=2)
    assert wait_until(lambda: index.synced)
    lists = api.pod_lists()
    assert [r.query.get("continue") for r in lists] == [None, "2", "4"]
    assert all(r.query["limit"] == "2" for r in lists)
    assert len(index) == 4
    assert metrics.get("infersight.k8s.pods.dropped") == 1
    pod = index.by_container(ids[0])
    assert pod is not None and dict(pod.labels) == {"a": "1", "b": "2"}
    assert metrics.get("infersight.k8s.labels.dropped") == 4  # one per indexed pod


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        PodIndex(K8sConfig(node_name="n", max_pods=0))
    with pytest.raises(ValueError):
        PodIndex(K8sConfig(node_name="n", backoff_initial_s=2, backoff_max_s=1))


def _proc_with(root: Path, pid: int, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "cgroup").write_text(cgroup)
    (d / "stat").write_text(f"{pid} (python3) S 1 {pid} " + " ".join(["0"] * 16) + " 4242 " + " ".join(["0"] * 20))


def test_pod_attributes_for_pid(api: FakeApiServer, make_index: Factory, tmp_path: Path) -> None:
    running, pending = cid(), cid()
    running_uid, pending_uid = uid(), uid()
    api.put_pod(make_pod("srv", namespace="ml", uid=running_uid, containers={"vllm": running},
                         owner=("apps/v1", "DaemonSet", "srv")))
    api.put_pod(make_pod("starting", namespace="ml", uid=pending_uid, containers={"vllm": None}))
    index, _ = make_index()
    assert wait_until(lambda: index.synced)
    u = running_uid.replace("-", "_")
    _proc_with(tmp_path, 10, f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/"
                             f"cri-containerd-{running}.scope\n")
    # Its container ID is not in the pod status yet, but the cgroup names the pod.
    _proc_with(tmp_path, 11, f"0::/kubepods/besteffort/pod{pending_uid}/{pending}\n")
    _proc_with(tmp_path, 12, "0::/system.slice/sshd.service\n")
    _proc_with(tmp_path, 13, f"0::/kubepods/besteffort/pod{uid()}/{cid()}\n")  # a pod of which nothing is known
    resolver = PidResolver(proc=str(tmp_path), metrics=SelfMetrics())
    assert pod_attributes_for_pid(10, resolver, index) == {
        "k8s.namespace.name": "ml",
        "k8s.pod.name": "srv",
        "k8s.pod.uid": running_uid,
        "k8s.container.name": "vllm",
        "k8s.node.name": "node-a",
        "k8s.daemonset.name": "srv",
    }
    attrs = pod_attributes_for_pid(11, resolver, index)
    assert attrs["k8s.pod.name"] == "starting" and "k8s.container.name" not in attrs
    assert pod_attributes_for_pid(12, resolver, index) == {}
    assert pod_attributes_for_pid(13, resolver, index) == {}
    assert pod_attributes_for_pid(99, resolver, index) == {}
    # The in-memory double, given the same pods, answers the same.
    double = StaticPodIndex([p for p in (index.by_uid(running_uid), index.by_uid(pending_uid)) if p is not None])
    for pid in (10, 11, 12, 13, 99):
        assert pod_attributes_for_pid(pid, resolver, double) == pod_attributes_for_pid(pid, resolver, index)
    double.remove(running_uid)
    assert pod_attributes_for_pid(10, resolver, double) == {}
