"""A fake Kubernetes API server, just enough for the official client's pod list+watch.

It runs a real HTTP server (``ThreadingHTTPServer``) in a thread, so the code
under test talks to it through the real ``kubernetes`` client, urllib3 and a
socket, as it would to a real API server. It serves:

* ``GET /api/v1/pods`` with ``fieldSelector=spec.nodeName=<node>`` (any other
  selector is a 400), ``limit``/``continue`` paging, and a numeric
  ``resourceVersion`` that grows with every change;
* ``GET /api/v1/pods?watch=true&resourceVersion=N&timeoutSeconds=T``: a chunked
  stream of ``ADDED``/``MODIFIED``/``DELETED`` events after ``N`` for the
  selected node, ended cleanly after ``T`` seconds; a version older than the
  compaction point gets one ``ERROR`` event carrying a 410 ``Status`` (as the
  real server does), and ``fail_next_watch_http`` answers the next watch with
  an HTTP error status instead;
* ``GET /apis/apps/v1/namespaces/<ns>/replicasets[/<name>]``.

Test controls: :meth:`stop` / :meth:`start` (same port), :meth:`disconnect_watches`
(drop open watch connections mid-stream), :meth:`expire` (compact history and
send 410 to open watches), :meth:`frozen` (changes are stored but not streamed,
like a lagging watch cache), and a log of every request.

Thread-safe: every method may be called from the test thread while client
threads are connected.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-a",
    uid: str,
    containers: dict[str, str | None],
    owner: tuple[str, str, str] | None = None,
    labels: dict[str, str] | None = None,
    runtime: str = "containerd",
    previous: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Pod as the API server returns it.

    ``containers``: container name → container ID (None while not started).
    ``owner``: (apiVersion, kind, name) of the controlling owner.
    ``previous``: container name → ID of its previous (terminated) instance.
    """
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "labels": dict(labels or {})}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner[0],
                "kind": owner[1],
                "name": owner[2],
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(owner))),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    statuses = []
    for cname, cid in containers.items():
        status: dict[str, Any] = {
            "name": cname,
            "image": f"registry.example/{cname}:1",
            "imageID": "",
            "ready": cid is not None,
            "restartCount": 1 if previous and cname in previous else 0,
            "started": cid is not None,
        }
        if cid is not None:
            status["containerID"] = f"{runtime}://{cid}"
            status["imageID"] = f"registry.example/{cname}@sha256:{'0' * 64}"
            status["state"] = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        else:
            status["state"] = {"waiting": {"reason": "ContainerCreating"}}
        if previous and cname in previous:
            status["lastState"] = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "OOMKilled",
                    "startedAt": "2025-12-31T00:00:00Z",
                    "finishedAt": "2025-12-31T23:59:59Z",
                    "containerID": f"{runtime}://{previous[cname]}",
                }
            }
        statuses.append(status)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": c, "image": f"registry.example/{c}:1"} for c in containers],
        },
        "status": {"phase": "Running", "containerStatuses": statuses},
    }


def make_replicaset(
    name: str, *, namespace: str = "default", deployment: str | None, template_hash: str
) -> dict[str, Any]:
    """A ReplicaSet, controlled by ``deployment`` when given."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"rs/{namespace}/{name}")),
        "labels": {"pod-template-hash": template_hash},
    }
    if deployment is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"deploy/{namespace}/{deployment}")),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": meta,
        "spec": {"replicas": 1, "selector": {"matchLabels": {"pod-template-hash": template_hash}}},
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    """See the module docstring. ``url`` is valid after the first :meth:`start`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, history: int = 10_000) -> None:
        self._host = host
        self._port = port
        self._history = history
        self._cond = threading.Condition()
        self._rv = 100
        self._visible_rv = self._rv  # watches stream events up to here (see frozen())
        self._compacted_rv = 0
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self._replicasets: dict[tuple[str, str], dict[str, Any]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped to end every open watch abruptly
        self._connections: set[socket.socket] = set()
        self._requests: list[Request] = []
        self.fail_next_watch_http: int | None = None
        self._frozen = False
        self._expire_generation = 0

    # ---- lifecycle ----

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on the same port; the stored pods and versions survive a restart."""
        if self._server is not None:
            return
        server = ThreadingHTTPServer((self._host, self._port), _handler_for(self))
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a crashed API server would."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()
        server.server_close()
        self.disconnect_watches()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state ----

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        # Caller holds the condition.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, kind, copy.deepcopy(obj)))
        if len(self._events) > self._history:
            dropped = self._events[: len(self._events) - self._history]
            del self._events[: len(dropped)]
            self._compacted_rv = max(self._compacted_rv, dropped[-1][0])
        if not self._frozen:
            self._visible_rv = self._rv
        self._cond.notify_all()

    def put_pod(self, pod: dict[str, Any]) -> str:
        """Create or replace a pod; returns its new resourceVersion."""
        pod = copy.deepcopy(pod)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._cond:
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._pods[key] = pod
            self._record(kind, pod)
            return str(self._rv)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._cond:
            pod = self._pods.pop((namespace, name))
            self._record("DELETED", pod)

    def put_replicaset(self, rs: dict[str, Any]) -> None:
        with self._cond:
            self._replicasets[(rs["metadata"]["namespace"], rs["metadata"]["name"])] = copy.deepcopy(rs)

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Inside, changes are stored (and listed) but not streamed to watches."""
        with self._cond:
            self._frozen = True
        try:
            yield
        finally:
            with self._cond:
                self._frozen = False
                self._visible_rv = self._rv
                self._cond.notify_all()

    def expire(self) -> None:
        """Compact all history: open watches get an ERROR 410 event; older versions can only relist."""
        with self._cond:
            self._compacted_rv = self._rv
            self._events.clear()
            self._expire_generation = self._generation + 1
            self._cond.notify_all()

    def disconnect_watches(self) -> None:
        """Drop every open connection mid-stream (no final chunk)."""
        with self._cond:
            self._generation += 1
            conns = list(self._connections)
            self._cond.notify_all()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- request log ----

    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def pod_lists(self) -> list[Request]:
        return [r for r in self.requests() if r.path == "/api/v1/pods" and not r.is_watch]

    def pod_watches(self) -> list[Request]:
        return [r for r in self.requests() if r.path == "/api/v1/pods" and r.is_watch]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Poll ``predicate()`` (no sleeps in tests): True once it holds, False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            with self._cond:
                self._cond.wait(0.02)
        return bool(predicate())


def _handler_for(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output readable

        def setup(self) -> None:
            super().setup()
            with api._cond:
                api._connections.add(self.connection)

        def finish(self) -> None:
            with api._cond:
                api._connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            with api._cond:
                api._requests.append(Request("GET", url.path, query))
            parts = [p for p in url.path.split("/") if p]
            if url.path == "/api/v1/pods":
                ok, node = self._node_selector(query.get("fieldSelector"))
                if not ok:
                    return
                if query.get("watch") in ("true", "1"):
                    self._watch(node, query)
                else:
                    self._list(node, query)
            elif parts[:4] == ["apis", "apps", "v1", "namespaces"] and len(parts) in (6, 7) and parts[5] == "replicasets":
                ns = parts[4]
                with api._cond:
                    if len(parts) == 7:
                        rs = api._replicasets.get((ns, parts[6]))
                        if rs is None:
                            self._json(404, _status(404, "NotFound", f'replicasets.apps "{parts[6]}" not found'))
                        else:
                            self._json(200, rs)
                        return
                    items = [v for (n, _), v in sorted(api._replicasets.items()) if n == ns]
                    body = {
                        "kind": "ReplicaSetList",
                        "apiVersion": "apps/v1",
                        "metadata": {"resourceVersion": str(api._rv)},
                        "items": items,
                    }
                self._json(200, body)
            else:
                self._json(404, _status(404, "NotFound", f"the server could not find {url.path}"))

        def _node_selector(self, selector: str | None) -> tuple[bool, str | None]:
            """(understood, node); node None means every node, as a real server allows."""
            if selector is None:
                return True, None
            key, sep, value = selector.partition("=")
            if key != "spec.nodeName" or not sep or "," in value:
                self._json(400, _status(400, "BadRequest", f"unsupported field selector {selector!r}"))
                return False, None
            return True, value

        def _list(self, node: str | None, query: dict[str, str]) -> None:
            with api._cond:
                pods = [p for _, p in sorted(api._pods.items()) if node is None or p["spec"]["nodeName"] == node]
                rv = api._rv
            start = 0
            cont = query.get("continue")
            if cont:
                start = int(cont)
            limit = int(query.get("limit") or 0)
            end = start + limit if limit else len(pods)
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if end < len(pods):
                meta["continue"] = str(end)
            self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": pods[start:end]})

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, node: str | None, query: dict[str, str]) -> None:
            code = api.fail_next_watch_http
            if code is not None:
                api.fail_next_watch_http = None
                self._json(code, _status(code, "Expired" if code == 410 else "InternalError", "injected failure"))
                return
            try:
                cursor = int(query.get("resourceVersion") or "0")
            except ValueError:
                self._json(400, _status(400, "BadRequest", "resourceVersion must be numeric"))
                return
            timeout = float(query.get("timeoutSeconds") or 1800)
            deadline = time.monotonic() + timeout
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with api._cond:
                generation = api._generation
                expire_seen = api._expire_generation
                too_old = cursor and cursor < api._compacted_rv
                compacted = api._compacted_rv
            try:
                if too_old:
                    err = _status(410, "Expired", f"too old resource version: {cursor} ({compacted})")
                    self._chunk(json.dumps({"type": "ERROR", "object": err}).encode() + b"\n")
                    self._chunk(b"")
                    return
                while True:
                    with api._cond:
                        if api._generation != generation:
                            return  # disconnect_watches(): end without the final chunk
                        if api._expire_generation != expire_seen:
                            batch = [("ERROR", _status(410, "Expired", "resource version compacted"))]
                            cursor = -1
                        else:
                            batch = [
                                (kind, obj)
                                for rv, kind, obj in api._events
                                if cursor < rv <= api._visible_rv and (node is None or obj["spec"]["nodeName"] == node)
                            ]
                            cursor = max(cursor, api._visible_rv)
                        if not batch:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            api._cond.wait(min(remaining, 1.0))
                            continue
                    for kind, obj in batch:
                        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    if cursor == -1:
                        break
                self._chunk(b"")
            except OSError:
                return  # the client went away
            finally:
                self.close_connection = True

    return Handler
