"""The pods on this node, from the Kubernetes API: container ID / pod UID → pod metadata.

:class:`PodIndex` lists and watches ``/api/v1/pods`` with
``fieldSelector=spec.nodeName=<this node>`` on its own thread, so the API server
only ever sends this node's pods (the agent never lists or watches cluster-wide),
and keeps two in-memory indexes the join reads without I/O: container ID → pod
and pod UID → pod. Owners are resolved to the workload people name:
``k8s.deployment.name`` through the pod's ReplicaSet (one cached GET per
ReplicaSet), ``k8s.statefulset.name`` / ``k8s.daemonset.name`` /
``k8s.job.name`` straight from the pod's ``ownerReferences``.

Watch protocol (https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):
list, remember the list's ``resourceVersion``, watch from it with
``timeoutSeconds``, advance the version with every event (and BOOKMARK), and
re-watch from the last version when a watch ends. ``410 Gone`` (an ``ERROR``
event whose Status has code 410, or an HTTP 410) means the version has been
compacted away: list again. Other failures retry with exponential backoff.

Failures degrade, never block: :meth:`PodIndex.start` returns at once; while
the API server is unreachable the indexes answer from what they last knew (empty
at first), ``infersight.collector.up{source="apiserver"}`` is 0, and one line is
logged per outage; the watch resumes by itself when the server returns.

RBAC needed: ``get``/``list``/``watch`` on ``pods`` and ``get``/``list``/``watch`` on
``replicasets`` (apps); this module uses only list+watch of pods with a node
field selector and get of single ReplicaSets.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from collectors.cgroup import PidResolver

log = logging.getLogger(__name__)

UP = "infersight.collector.up"
UP_LABELS = (("source", "apiserver"),)

# ownerReference kind → OpenTelemetry semantic-convention attribute.
OWNER_ATTRIBUTES: Mapping[str, str] = MappingProxyType(
    {
        "Deployment": "k8s.deployment.name",
        "ReplicaSet": "k8s.replicaset.name",
        "StatefulSet": "k8s.statefulset.name",
        "DaemonSet": "k8s.daemonset.name",
        "Job": "k8s.job.name",
    }
)


@dataclass(frozen=True)
class K8sConfig:
    """Where the API server is and how hard the pod index may lean on it. Validated by :class:`PodIndex`."""

    node_name: str | None = None
    """The node whose pods are indexed (env ``NODE_NAME``, from the downward API, when None)."""
    api_url: str | None = None
    """An explicit API server URL (tests, ``kubectl proxy``); when set it wins over in-cluster config and kubeconfig."""
    kubeconfig: str | None = None
    """Kubeconfig path tried when not in a cluster (None: ``$KUBECONFIG`` or ``~/.kube/config``)."""
    watch_timeout_s: int = 300
    """``timeoutSeconds`` asked of each watch; the server ends the watch after it and the index re-watches."""
    request_timeout_s: float = 10.0
    """Connect and read timeout of list and get requests (a watch reads for ``watch_timeout_s`` + this)."""
    backoff_initial_s: float = 0.5
    """First retry delay after a failure; doubles per consecutive failure."""
    backoff_max_s: float = 30.0
    """Largest retry delay."""
    list_page_size: int = 500
    """``limit`` of each list page."""
    max_pods: int = 1024
    """Most live pods indexed (a node runs 110 by default); more are dropped and counted."""
    deleted_retention_s: float = 300.0
    """How long a deleted pod still resolves, for records that arrive late."""
    max_deleted_pods: int = 1024
    """Most deleted pods kept resolvable (LRU)."""
    max_replicasets: int = 1024
    """Most ReplicaSet → Deployment answers cached (LRU)."""
    max_labels: int = 64
    """Most labels kept per pod (sorted by key); the rest are dropped and counted."""
    max_event_bytes: int = 4 << 20
    """Largest watch event line accepted; a larger one is counted and the index relists."""

    def validate(self) -> None:
        """Raise ValueError for a setting that cannot work."""
        for name in ("watch_timeout_s", "list_page_size", "max_pods", "max_deleted_pods", "max_replicasets"):
            if getattr(self, name) < 1:
                raise ValueError(f"K8sConfig.{name} must be at least 1")
        if self.request_timeout_s <= 0 or self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("K8sConfig timeouts and backoff must be positive, backoff_max_s >= backoff_initial_s")


@dataclass(frozen=True, eq=True)
class PodInfo:
    """One pod, as the index knows it. Immutable; replaced whole on every change."""

    namespace: str
    name: str
    uid: str
    node: str
    containers: Mapping[str, str] = field(default_factory=dict)
    """Container ID (no ``containerd://`` prefix) → container name; current and previous instances."""
    owner_kind: str | None = None
    """``Deployment``, ``StatefulSet``, ``DaemonSet``, ``Job``, ``ReplicaSet`` (no Deployment above it), other, or None."""
    owner_name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def attributes(self, container_id: str | None = None) -> dict[str, str]:
        """OpenTelemetry ``k8s.*`` attributes; ``k8s.container.name`` only when ``container_id`` is known."""
        out = {
            "k8s.namespace.name": self.namespace,
            "k8s.pod.name": self.name,
            "k8s.pod.uid": self.uid,
            "k8s.node.name": self.node,
        }
        if container_id is not None:
            name = self.containers.get(strip_runtime_prefix(container_id))
            if name is not None:
                out["k8s.container.name"] = name
        if self.owner_kind is not None and self.owner_name is not None:
            key = OWNER_ATTRIBUTES.get(self.owner_kind)
            if key is not None:
                out[key] = self.owner_name
        return out


def strip_runtime_prefix(container_id: str) -> str:
    """``containerd://<id>`` / ``cri-o://<id>`` / ``docker://<id>`` → ``<id>``."""
    return container_id.split("://", 1)[-1]


class _Expired(Exception):
    """The watch's resourceVersion is gone (410): relist."""


class _StreamBroken(Exception):
    """A watch that had started ended abnormally: re-watch from the last version."""


def _container_ids(status: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            name = cs.get("name")
            if not name:
                continue
            # The previous instance of a restarted container: its late records still resolve.
            last = ((cs.get("lastState") or {}).get("terminated") or {}).get("containerID")
            for cid in (last, cs.get("containerID")):
                if cid:
                    out[strip_runtime_prefix(cid)] = name
    return out


def _controller_ref(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    refs = meta.get("ownerReferences") or ()
    chosen = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not chosen or not chosen.get("kind") or not chosen.get("name"):
        return None
    return str(chosen["kind"]), str(chosen["name"])


class PodIndex:
    """This node's pods, kept current by a list+watch on a background thread.

    Threading: :meth:`start` and :meth:`stop` from one owning thread; the lookups
    (:meth:`by_container`, :meth:`by_uid`) from any thread, without I/O.
    Nothing here raises after construction; failures are counted in ``metrics``
    and logged once per outage. The constructor raises ValueError for a bad config.
    """

    def __init__(
        self,
        config: K8sConfig | None = None,
        *,
        metrics: SelfMetrics = SELF_METRICS,
        api_client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or K8sConfig()
        self._config.validate()
        self._node = self._config.node_name or os.environ.get("NODE_NAME") or None
        self._metrics = metrics
        self._given_client = api_client
        self._clock = clock
        self._lock = threading.Lock()
        self._pods: dict[str, PodInfo] = {}
        self._by_container: dict[str, str] = {}
        self._deleted: OrderedDict[str, tuple[PodInfo, float]] = OrderedDict()
        self._deleted_by_container: dict[str, str] = {}
        self._rs_owner: OrderedDict[tuple[str, str], tuple[str, str] | None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active: Any = None  # the open watch response, closed by stop() to unblock its read
        self._client: Any = None
        self._core: Any = None
        self._apps: Any = None
        self._rv: str | None = None
        self._up: bool | None = None  # None: never tried
        self._synced = threading.Event()
        metrics.describe(UP, "gauge", "1 when the collector's source answers, by source.")
        metrics.describe("infersight.k8s.api.errors", "counter", "Failed Kubernetes API requests, by reason.")
        metrics.describe("infersight.k8s.watch.restarts", "counter", "Pod watches re-opened, by reason.")
        metrics.describe("infersight.k8s.relists", "counter", "Full pod relists after the first.")
        metrics.describe("infersight.k8s.pods.dropped", "counter", "Pods not indexed because max_pods was reached.")
        metrics.describe("infersight.k8s.labels.dropped", "counter", "Pod labels dropped by max_labels, per pod update.")
        metrics.describe("infersight.cache.evictions", "counter", "Entries evicted from a bounded cache, by cache.")

    # ---- public lookups -------------------------------------------------------------------------

    def by_container(self, container_id: str) -> PodInfo | None:
        """The pod running ``container_id`` (with or without a runtime prefix), live or recently deleted."""
        cid = strip_runtime_prefix(container_id)
        with self._lock:
            uid = self._by_container.get(cid)
            if uid is not None:
                return self._pods.get(uid)
            uid = self._deleted_by_container.get(cid)
            return self._deleted_lookup(uid) if uid is not None else None

    def by_uid(self, pod_uid: str) -> PodInfo | None:
        """The pod with this UID, live or recently deleted."""
        with self._lock:
            pod = self._pods.get(pod_uid)
            return pod if pod is not None else self._deleted_lookup(pod_uid)

    @property
    def node_name(self) -> str | None:
        return self._node

    @property
    def up(self) -> bool:
        """Whether the last request to the API server succeeded."""
        return bool(self._up)

    @property
    def synced(self) -> bool:
        """Whether a first full list has completed."""
        return self._synced.is_set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the list+watch thread and return at once. Never raises, never blocks on the network."""
        if self._thread is not None:
            return
        self._metrics.set(UP, 0, UP_LABELS)
        if not self._node:
            # Without a node name the only way to see this node's pods would be a
            # cluster-wide watch, which the agent never does.
            log.warning("k8s: no node name (set NODE_NAME from spec.nodeName); running without k8s attributes")
            self._up = False
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="infersight-k8s-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the watch thread (interrupting an open watch) and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        resp = self._active
        if resp is not None:
            _interrupt(resp)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._client is not None and self._given_client is None:
            try:
                self._client.close()
            except Exception:  # closing a pool that never opened; nothing to recover
                pass
            self._client = None
            self._core = self._apps = None

    # ---- the watch thread -----------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self._config
        delay = cfg.backoff_initial_s
        while not self._stop.is_set():
            began = self._clock()
            try:
                if self._core is None:
                    self._connect()
                if self._rv is None:
                    self._rv = self._relist()
                self._watch()
                delay = cfg.backoff_initial_s
                self._metrics.inc("infersight.k8s.watch.restarts", labels=(("reason", "timeout"),))
                # A server that ends every watch at once must not turn this into a busy loop.
                wait = 0.0 if self._clock() - began >= 1.0 else cfg.backoff_initial_s
            except _Expired:
                self._rv = None
                self._metrics.inc("infersight.k8s.watch.restarts", labels=(("reason", "expired"),))
                # Relist at once; but an expiry straight after a relist means the server
                # keeps refusing, so back off like any failure.
                wait = 0.0 if self._clock() - began >= 1.0 else delay
                delay = min(delay * 2, cfg.backoff_max_s)
            except _StreamBroken as e:
                # The server had answered; the connection dropped. Re-watch from the
                # last version after the shortest delay, without calling the server down.
                self._metrics.inc("infersight.k8s.watch.restarts", labels=(("reason", "disconnect"),))
                log.debug("k8s: watch stream ended: %s", e)
                wait = cfg.backoff_initial_s
            except _ConfigError as e:
                self._mark_down("config", e)
                return  # not in a cluster and no kubeconfig: nothing will change by retrying
            except Exception as e:
                status = getattr(e, "status", None)
                if status == 410:
                    self._rv = None
                    self._metrics.inc("infersight.k8s.watch.restarts", labels=(("reason", "expired"),))
                    wait = 0.0 if self._clock() - began >= 1.0 else delay
                    delay = min(delay * 2, cfg.backoff_max_s)
                    if wait:
                        self._stop.wait(wait)
                    continue
                self._mark_down(f"http_{status}" if status else "unreachable", e)
                wait = delay
                delay = min(delay * 2, cfg.backoff_max_s)
            if wait > 0:
                # Jitter keeps a fleet of agents from reconnecting in step after an API server restart.
                self._stop.wait(wait * random.uniform(0.8, 1.0))

    def _connect(self) -> None:
        import kubernetes  # deferred: importing the client costs ~0.3 s and most tests never need it

        if self._given_client is not None:
            client = self._given_client
        else:
            conf = kubernetes.client.Configuration()
            if self._config.api_url:
                conf.host = self._config.api_url
            else:
                try:
                    kubernetes.config.load_incluster_config(client_configuration=conf)
                except kubernetes.config.ConfigException:
                    try:
                        kubernetes.config.load_kube_config(
                            config_file=self._config.kubeconfig, client_configuration=conf
                        )
                    except Exception as e:
                        raise _ConfigError(f"no in-cluster config and no usable kubeconfig: {e}") from e
            # This loop retries with backoff; urllib3's own immediate retries would only
            # delay noticing an outage.
            conf.retries = False
            client = kubernetes.client.ApiClient(conf)
        self._client = client
        self._core = kubernetes.client.CoreV1Api(client)
        self._apps = kubernetes.client.AppsV1Api(client)

    def _mark_up(self) -> None:
        if self._up is False:
            log.info("k8s: API server reachable again; pod attributes resume")
        self._up = True
        self._metrics.set(UP, 1, UP_LABELS)

    def _mark_down(self, reason: str, err: BaseException) -> None:
        self._metrics.inc("infersight.k8s.api.errors", labels=(("reason", reason),))
        self._metrics.set(UP, 0, UP_LABELS)
        if self._up is not False:
            log.warning("k8s: API server unavailable (%s: %s); running without fresh k8s attributes", reason, err)
        self._up = False

    def _relist(self) -> str:
        cfg = self._config
        selector = f"spec.nodeName={self._node}"
        items: list[dict[str, Any]] = []
        cont: str | None = None
        rv = ""
        while True:
            resp = self._core.list_pod_for_all_namespaces(
                field_selector=selector,
                limit=cfg.list_page_size,
                _continue=cont,
                _preload_content=False,
                _request_timeout=(cfg.request_timeout_s, cfg.request_timeout_s),
            )
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or None
            if not cont:
                break
        if self._synced.is_set():
            self._metrics.inc("infersight.k8s.relists")
        # The server answered: say so before its pods become visible, so that
        # whoever sees them also sees the source up.
        self._mark_up()
        self._replace_all(items)
        self._synced.set()
        return rv

    def _watch(self) -> None:
        cfg = self._config
        resp = self._core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self._node}",
            watch=True,
            resource_version=self._rv,
            timeout_seconds=cfg.watch_timeout_s,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(cfg.request_timeout_s, cfg.watch_timeout_s + cfg.request_timeout_s),
        )
        self._active = resp
        self._mark_up()
        try:
            if self._stop.is_set():
                return
            for line in self._lines(resp):
                self._apply(json.loads(line))
        except (_Expired, _StreamBroken):
            raise
        except Exception as e:
            if self._stop.is_set():
                return
            raise _StreamBroken(f"{type(e).__name__}: {e}") from e
        finally:
            self._active = None
            _interrupt(resp)

    def _lines(self, resp: Any) -> Iterator[bytes]:
        limit = self._config.max_event_bytes
        buf = bytearray()
        for chunk in resp.stream(amt=None, decode_content=True):
            buf.extend(chunk)
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if line.strip():
                    yield line
            if len(buf) > limit:
                # One event lost; only a relist can make the index whole again.
                self._metrics.inc("infersight.k8s.api.errors", labels=(("reason", "oversize_event"),))
                raise _Expired("watch event larger than max_event_bytes")

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired(obj.get("message", "resource version expired"))
            raise _StreamBroken(f"watch ERROR event, code {code}: {obj.get('message', '')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(obj)
        elif kind == "DELETED":
            uid = (obj.get("metadata") or {}).get("uid")
            if uid:
                with self._lock:
                    self._retire(uid)
        # BOOKMARK carries only the version.
        if rv:
            self._rv = str(rv)

    # ---- index maintenance (watch thread) -------------------------------------------------------

    def _pod_info(self, obj: Mapping[str, Any]) -> PodInfo | None:
        meta = obj.get("metadata") or {}
        uid, name, ns = meta.get("uid"), meta.get("name"), meta.get("namespace")
        if not uid or not name or not ns:
            return None
        labels_all = meta.get("labels") or {}
        keys = sorted(labels_all)
        if len(keys) > self._config.max_labels:
            self._metrics.inc("infersight.k8s.labels.dropped", len(keys) - self._config.max_labels)
            keys = keys[: self._config.max_labels]
        labels = {k: str(labels_all[k]) for k in keys}
        owner_kind, owner_name = self._resolve_owner(ns, meta, labels_all)
        return PodInfo(
            namespace=ns,
            name=name,
            uid=uid,
            node=str((obj.get("spec") or {}).get("nodeName") or self._node or ""),
            containers=MappingProxyType(_container_ids(obj.get("status") or {})),
            owner_kind=owner_kind,
            owner_name=owner_name,
            labels=MappingProxyType(labels),
        )

    def _upsert(self, obj: Mapping[str, Any]) -> None:
        pod_uid = (obj.get("metadata") or {}).get("uid")
        with self._lock:
            # Checked before building the record, so a dropped pod costs no ReplicaSet lookup.
            if pod_uid not in self._pods and len(self._pods) >= self._config.max_pods:
                self._metrics.inc("infersight.k8s.pods.dropped")
                return
        info = self._pod_info(obj)
        if info is None:
            return
        with self._lock:
            old = self._pods.get(info.uid)
            if old is None and len(self._pods) >= self._config.max_pods:
                self._metrics.inc("infersight.k8s.pods.dropped")
                return
            if old is not None:
                for cid in old.containers:
                    if cid not in info.containers and self._by_container.get(cid) == info.uid:
                        del self._by_container[cid]
            self._pods[info.uid] = info
            for cid in info.containers:
                self._by_container[cid] = info.uid
            # A pod seen again (a relist racing a delete) is live, not a tombstone.
            tomb = self._deleted.pop(info.uid, None)
            if tomb is not None:
                self._forget_deleted(tomb[0])

    def _replace_all(self, items: list[dict[str, Any]]) -> None:
        seen: set[str] = set()
        for obj in items:
            uid = (obj.get("metadata") or {}).get("uid")
            if uid:
                seen.add(uid)
            self._upsert(obj)
        with self._lock:
            for uid in [u for u in self._pods if u not in seen]:
                self._retire(uid)

    def _retire(self, uid: str) -> None:
        """Move a live pod to the deleted LRU. Caller holds the lock."""
        info = self._pods.pop(uid, None)
        if info is None:
            return
        for cid in info.containers:
            if self._by_container.get(cid) == uid:
                del self._by_container[cid]
            self._deleted_by_container[cid] = uid
        self._deleted[uid] = (info, self._clock())
        self._deleted.move_to_end(uid)
        while len(self._deleted) > self._config.max_deleted_pods:
            _, (old, _) = self._deleted.popitem(last=False)
            self._forget_deleted(old)
            self._metrics.inc("infersight.cache.evictions", labels=(("cache", "k8s_deleted_pods"),))

    def _deleted_lookup(self, uid: str) -> PodInfo | None:
        """A deleted pod still within its retention. Caller holds the lock."""
        entry = self._deleted.get(uid)
        if entry is None:
            return None
        info, at = entry
        if self._clock() - at > self._config.deleted_retention_s:
            # Entries are in deletion order, so everything before this one has expired too.
            while self._deleted:
                first, first_at = next(iter(self._deleted.values()))
                if self._clock() - first_at <= self._config.deleted_retention_s:
                    break
                self._deleted.popitem(last=False)
                self._forget_deleted(first)
            return None
        return info

    def _forget_deleted(self, info: PodInfo) -> None:
        """Drop a tombstone's container entries. Caller holds the lock."""
        for cid in info.containers:
            if self._deleted_by_container.get(cid) == info.uid:
                del self._deleted_by_container[cid]

    def _resolve_owner(
        self, namespace: str, meta: Mapping[str, Any], labels: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        ref = _controller_ref(meta)
        if ref is None:
            return None, None
        kind, name = ref
        if kind != "ReplicaSet":
            return kind, name
        key = (namespace, name)
        with self._lock:
            if key in self._rs_owner:
                self._rs_owner.move_to_end(key)
                cached = self._rs_owner[key]
                return cached if cached is not None else (kind, name)
        try:
            owner = self._read_replicaset_owner(namespace, name)
        except Exception as e:
            status = getattr(e, "status", None)
            self._metrics.inc(
                "infersight.k8s.api.errors", labels=(("reason", f"replicaset_http_{status}" if status else "replicaset"),)
            )
            log.debug("k8s: replicaset %s/%s lookup failed: %s", namespace, name, e)
            # Not cached, so the next event for a pod of this ReplicaSet asks again.
            # Meanwhile the Deployment controller's naming rule (<deployment>-<pod-template-hash>) answers.
            template_hash = labels.get("pod-template-hash")
            if template_hash and name.endswith("-" + template_hash):
                return "Deployment", name[: -len(template_hash) - 1]
            return kind, name
        with self._lock:
            self._rs_owner[key] = owner
            while len(self._rs_owner) > self._config.max_replicasets:
                self._rs_owner.popitem(last=False)
                self._metrics.inc("infersight.cache.evictions", labels=(("cache", "k8s_replicasets"),))
        return owner if owner is not None else (kind, name)

    def _read_replicaset_owner(self, namespace: str, name: str) -> tuple[str, str] | None:
        cfg = self._config
        resp = self._apps.read_namespaced_replica_set(
            name,
            namespace,
            _preload_content=False,
            _request_timeout=(cfg.request_timeout_s, cfg.request_timeout_s),
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        ref = _controller_ref(body.get("metadata") or {})
        return ref if ref is not None and ref[0] == "Deployment" else None


class _ConfigError(Exception):
    """No way to reach an API server is configured."""


def _interrupt(resp: Any) -> None:
    """Unblock a thread reading ``resp`` and free its connection. Never raises."""
    try:
        shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3: safe from another thread
        if shutdown is not None:
            shutdown()
        resp.release_conn()
    except Exception:  # the connection is already gone, which is what we wanted
        pass


class PodLookup(Protocol):
    """What consumers of pod metadata need: :class:`PodIndex` in the agent, :class:`StaticPodIndex` in tests."""

    def by_container(self, container_id: str) -> PodInfo | None: ...

    def by_uid(self, pod_uid: str) -> PodInfo | None: ...


class StaticPodIndex:
    """An in-memory :class:`PodLookup` over fixed pods, for tests of code that reads pod metadata.

    Thread-safe for lookups; :meth:`put` and :meth:`remove` from the test thread.
    """

    def __init__(self, pods: Iterable[PodInfo] = ()) -> None:
        self._pods: dict[str, PodInfo] = {}
        for pod in pods:
            self.put(pod)

    def put(self, pod: PodInfo) -> None:
        self._pods = {**self._pods, pod.uid: pod}

    def remove(self, pod_uid: str) -> None:
        self._pods = {u: p for u, p in self._pods.items() if u != pod_uid}

    def by_container(self, container_id: str) -> PodInfo | None:
        cid = strip_runtime_prefix(container_id)
        return next((p for p in self._pods.values() if cid in p.containers), None)

    def by_uid(self, pod_uid: str) -> PodInfo | None:
        return self._pods.get(pod_uid)


def pod_attributes_for_pid(pid: int, resolver: PidResolver, index: PodLookup) -> dict[str, str]:
    """``k8s.*`` attributes of the pod process ``pid`` runs in; ``{}`` when unknown.

    Goes PID → container (cgroup path) → pod (index). A container the pod status
    does not list yet still resolves to its pod through the pod UID in the cgroup
    path, without ``k8s.container.name``. Never raises; no network I/O.
    """
    ref = resolver.resolve(pid)
    if ref is None:
        return {}
    pod = index.by_container(ref.container_id)
    if pod is not None:
        return pod.attributes(ref.container_id)
    if ref.pod_uid is not None:
        pod = index.by_uid(ref.pod_uid)
        if pod is not None:
            return pod.attributes()
    return {}
