"""Attribute bounds: what keeps metric label values few.

A metric label must take a small, known number of values, or the agent's
memory and every backend's index grow with the traffic. This module turns the
raw request fields into bounded ones:

- :func:`template_route` folds a raw path into a route template: the query
  string is dropped, KServe v2 model and version segments become ``{model}`` /
  ``{version}``, and identifier-like segments (numbers, UUIDs, long hex, long
  mixed tokens) become ``{id}``;
- :func:`bound_method` keeps the methods RFC 9110 (plus PATCH) defines and folds
  the rest to ``_OTHER`` (OpenTelemetry HTTP semconv, ``http.request.method``);
- :class:`AttributeBounds` caps the distinct values of routes, model names,
  RPC services, methods and ports, and ``k8s.*`` names; a value past the cap
  becomes ``other``.

Every fold is counted in ``infersight.attributes.folded`` by attribute and reason
(``cap``, ``unknown``, ``too_long``), so a dashboard can tell "few routes" from
"routes folded away". Templating a path is not a fold: it is the normal case.

Never used as labels: pid, raw path, client address or port, connection ids.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.selfmetrics import SELF_METRICS, SelfMetrics

OTHER: Final = "other"
OTHER_METHOD: Final = "_OTHER"
FOLDED: Final = "infersight.attributes.folded"

# RFC 9110 section 9 methods plus PATCH (RFC 5789): the set semconv names.
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

#: The ``k8s.*`` attributes that become metric labels (all others stay on spans only).
K8S_LABEL_KEYS: Final[tuple[str, ...]] = (
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.container.name",
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.node.name",
)

# The highest gRPC status code defined (UNAUTHENTICATED); grpc/doc/statuscodes.md.
MAX_GRPC_STATUS: Final = 16

# Raw values longer than this are folded before any other work: a label value
# is an index key in every backend, and a 10 kB "model name" is an attack.
MAX_VALUE_LEN: Final = 256
MAX_PATH_LEN = 2048
# A route deeper than this keeps its first segments and ends in "/{...}".
MAX_SEGMENTS = 8

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]{8,}$")
_NUMBER = re.compile(r"^[0-9]+([.,_-][0-9]+)*$")
# Request ids such as "chatcmpl-9fq2XbT1kLm0aZ..." or base64 tokens: long and with a digit.
_TOKEN = re.compile(r"^(?=.*[0-9])[A-Za-z0-9_=+-]{16,}$")


def _is_identifier(segment: str) -> bool:
    if _NUMBER.match(segment) or _UUID.match(segment):
        return True
    if _HEX.match(segment) and any(c.isdigit() for c in segment):
        return True
    return bool(_TOKEN.match(segment))


# Paths repeat (a server has few endpoints), and each record needs its route three
# times (metrics, span name, span attribute): memoise, bounded.
@functools.lru_cache(maxsize=4096)
def template_route(path: str | None) -> str:
    """The route template of a raw request path ("" when the path is unknown).

    Pure function; never raises. ``/v2/models/llama/versions/3/infer?x=1``
    becomes ``/v2/models/{model}/versions/{version}/infer``;
    ``/v1/files/file-1234567890abcdef`` becomes ``/v1/files/{id}``.
    """
    if not path:
        return ""
    path = path[:MAX_PATH_LEN]
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if not path.startswith("/"):
        # Absolute-form request targets (proxies) carry scheme and host: keep the path only.
        scheme = path.find("://")
        if scheme >= 0:
            slash = path.find("/", scheme + 3)
            path = path[slash:] if slash >= 0 else "/"
        else:
            path = "/" + path
    raw = [s for s in path.split("/") if s]
    out: list[str] = []
    for i, seg in enumerate(raw):
        prev = raw[i - 1] if i > 0 else ""
        if prev == "models" and i >= 2 and raw[0] == "v2":
            # KServe / Triton v2: /v2/models/{model}[/versions/{version}]/...
            out.append("{model}")
        elif prev == "versions" and i >= 3 and raw[0] == "v2":
            out.append("{version}")
        elif _is_identifier(seg):
            out.append("{id}")
        else:
            out.append(seg)
        if len(out) == MAX_SEGMENTS:
            if i + 1 < len(raw):
                out.append("{...}")
            break
    return "/" + "/".join(out) if out else "/"


def bound_method(method: str | None) -> tuple[str, bool]:
    """``(method, folded)``: a known method in upper case, else ``_OTHER``.

    ``None`` (the wire did not show one) stays ``""`` and is not a fold.
    """
    if method is None:
        return "", False
    up = method.upper()
    if up in KNOWN_METHODS:
        return up, False
    return OTHER_METHOD, True


#: Request paths whose route template is remembered (a server sees a handful; when
#: more arrive the memo starts again, counted as infersight.cache.evictions{cache=route_template}).
ROUTE_MEMO_SIZE: Final = 4096

_NO_K8S_VALUES: Final[tuple[str, ...]] = ("",) * len(K8S_LABEL_KEYS)


class _Cap:
    """A set of admitted values that stops growing at ``limit``; later values fold."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def has(self, value: str) -> bool:
        return value in self._seen

    def admit(self, value: str) -> bool:
        if value in self._seen:
            return True
        if len(self._seen) >= self._limit:
            return False
        self._seen.add(value)
        return True

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True, slots=True)
class BoundsConfig:
    """Caps on distinct metric label values."""

    #: distinct ``gen_ai.request.model`` values; later ones become ``other``.
    model_cap: int = 64
    #: distinct ``http.route`` values; later ones become ``other``.
    route_cap: int = 128
    #: distinct values per ``k8s.*`` label key (a node runs at most a few hundred pods).
    k8s_cap: int = 512
    #: distinct label sets per metric from an ``add_point_source`` source.
    point_series_cap: int = 2048
    #: distinct values of each of ``rpc.system``, ``rpc.service``, ``rpc.method`` and
    #: ``server.port`` on RPC metrics (a method name comes from the client's ``:path``).
    rpc_cap: int = 128


class AttributeBounds:
    """Applies the caps. Thread-safe: emit and collection threads share one instance.

    Caps only grow until full and are never reset while the agent runs: a value
    admitted once keeps its own series (Prometheus counters must not change
    identity mid-life). Never raises.
    """

    def __init__(self, config: BoundsConfig = BoundsConfig(), metrics: SelfMetrics = SELF_METRICS) -> None:
        self.config = config
        self._metrics = metrics
        self._lock = threading.Lock()
        self._caps: dict[str, _Cap] = {}
        # raw path -> its template (a pure function of the path), most ROUTE_MEMO_SIZE
        self._templates: dict[str, str] = {}
        metrics.describe(
            FOLDED, "counter", "Metric attribute values folded to a bounded value, by attribute and reason"
        )
        metrics.describe("infersight.cache.evictions", "counter", "Entries evicted from a bounded cache, by cache.")

    def _fold(self, attribute: str, reason: str) -> None:
        self._metrics.inc(FOLDED, labels=(("attribute", attribute), ("reason", reason)))

    def _capped(self, attribute: str, value: str, limit: int) -> str:
        if not value:
            return ""
        if len(value) > MAX_VALUE_LEN:
            self._fold(attribute, "too_long")
            return OTHER
        cap = self._caps.get(attribute)
        if cap is not None and cap.has(value):
            return value  # admitted before (caps only grow): no lock
        with self._lock:
            cap = self._caps.get(attribute)
            if cap is None:
                cap = self._caps[attribute] = _Cap(limit)
            ok = cap.admit(value)
        if not ok:
            self._fold(attribute, "cap")
            return OTHER
        return value

    def method(self, method: str | None) -> str:
        value, folded = bound_method(method)
        if folded:
            self._fold("http.request.method", "unknown")
        return value

    def route(self, path: str | None) -> str:
        if path is None:
            return ""
        template = self._templates.get(path)
        if template is None:
            template = template_route(path)
            templates = self._templates
            if len(templates) >= ROUTE_MEMO_SIZE:
                self._metrics.inc("infersight.cache.evictions", len(templates), (("cache", "route_template"),))
                templates.clear()
            templates[path] = template
        return self._capped("http.route", template, self.config.route_cap)

    def model(self, model: str | None) -> str:
        return self._capped("gen_ai.request.model", model or "", self.config.model_cap)

    def rpc(self, key: str, value: Any) -> str:
        """A bounded RPC label value (``rpc.system``, ``rpc.service``, ``rpc.method``, ``server.port``)."""
        if value is None or isinstance(value, bool):
            return ""
        return self._capped(key, str(value), self.config.rpc_cap)

    def grpc_status(self, code: int | None) -> str:
        """``rpc.grpc.status_code`` as a label, "0".."16"; another number folds to ``other``."""
        if code is None:
            return ""
        if 0 <= code <= MAX_GRPC_STATUS:
            return str(code)
        self._fold("rpc.grpc.status_code", "unknown")
        return OTHER

    def k8s(self, attributes: Mapping[str, Any]) -> dict[str, str]:
        """The bounded ``k8s.*`` label subset of a record's attributes ("" where absent)."""
        return dict(zip(K8S_LABEL_KEYS, self.k8s_values(attributes), strict=True))

    def k8s_values(self, attributes: Mapping[str, Any]) -> tuple[str, ...]:
        """:meth:`k8s`'s values in ``K8S_LABEL_KEYS`` order, as the metric instruments key
        their series: no dict is built per record."""
        if not attributes:  # outside Kubernetes (and in tests) most records have none
            return _NO_K8S_VALUES
        cap = self.config.k8s_cap
        return tuple([
            self._capped(key, str(raw), cap) if (raw := attributes.get(key)) not in (None, "") else ""
            for key in K8S_LABEL_KEYS
        ])

    def series(self, metric: str, labels: tuple[tuple[str, str], ...]) -> bool:
        """Whether a label set of a point-source metric may have its own series."""
        key = "|".join(f"{k}={v}" for k, v in labels)
        with self._lock:
            cap = self._caps.get("series:" + metric)
            if cap is None:
                cap = self._caps["series:" + metric] = _Cap(self.config.point_series_cap)
            ok = cap.admit(key)
        if not ok:
            self._fold(metric, "cap")
        return ok

    def sizes(self) -> dict[str, int]:
        """Distinct values admitted so far, per attribute (for tests and debugging)."""
        with self._lock:
            return {k: len(v) for k, v in self._caps.items()}


# Attribute keys that carry message content under OTel GenAI / HTTP semconv. The
# parsers never produce them; this is the exporters' second line of defence, so
# that no later stage can leak a prompt or a completion by adding one.
BODY_ATTRIBUTE_PREFIXES: tuple[str, ...] = (
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
    "http.request.body",
    "http.response.body",
    "url.query",
    "url.full",
)
REFUSED = "infersight.export.attributes.refused"


def is_body_attribute(key: str) -> bool:
    """Whether ``key`` may hold request or response content (never exported)."""
    return key.startswith(BODY_ATTRIBUTE_PREFIXES)


def strip_query(path: str) -> str:
    """``path`` without query string or fragment: query values may carry prompts or secrets."""
    return path.split("?", 1)[0].split("#", 1)[0]


def label_name(attribute: str) -> str:
    """The Prometheus label name of an OTel attribute key (``k8s.pod.name`` -> ``k8s_pod_name``)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", attribute)
    return "_" + out if out[:1].isdigit() else out


def point_labels(
    attributes: Mapping[str, Any], bounds: AttributeBounds, drop: Iterable[str] = ("process.pid",)
) -> tuple[tuple[str, str], ...]:
    """Sorted, bounded ``(key, value)`` pairs of a collector point's attributes.

    ``process.pid`` (and any key in ``drop``) never becomes a label; ``k8s.*``
    label keys are capped like request labels; other values are cut to
    ``MAX_VALUE_LEN``.
    """
    dropped = set(drop)
    k8s = bounds.k8s(attributes)
    out: list[tuple[str, str]] = []
    for key, raw in attributes.items():
        if key in dropped or raw is None:
            continue
        if key in k8s:
            value = k8s[key]
        else:
            value = str(raw)
            if len(value) > MAX_VALUE_LEN:
                value = OTHER
        out.append((key, value))
    return tuple(sorted(out))
