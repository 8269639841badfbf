"""PID → container, read from ``/proc/<pid>/cgroup``.

The kubelet names a container's cgroup after its pod UID and QoS class, and the
runtime names the leaf after the container ID, so the path alone tells which
container (and which pod) a process belongs to. Shapes handled:

* cgroup v2 (one ``0::/path`` line) and v1 (one line per hierarchy; the first
  line whose path names a container wins; v1 and v2 lines agree on Kubernetes);
* the kubelet's systemd driver
  (``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope``)
  and cgroupfs driver (``/kubepods/burstable/pod<uid>/<id>``);
* containerd (``cri-containerd-<id>.scope``), CRI-O (``crio-<id>.scope``; its
  ``crio-conmon-<id>.scope`` monitor is not the container), Docker
  (``docker-<id>.scope``, ``/docker/<id>``) and Podman (``libpod-<id>.scope``).

The agent needs ``hostPID`` and the host's ``/proc``. From inside a private
cgroup namespace (the default for pods on cgroup v2) other containers' paths
read relative to the agent's own cgroup (``0::/../../kubepods-…-pod<uid>.slice/…``);
those still resolve, except that a container of the agent's own pod shows no
pod component (its pod UID is then None; the container ID still resolves).

The functions are pure apart from reading files under ``proc``; they never
raise for a vanished or unreadable process (they return ``None``).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent.selfmetrics import SELF_METRICS, SelfMetrics

# A container ID is 64 lowercase hex digits for containerd, CRI-O, Docker and
# Podman alike. Requiring all 64 keeps unrelated hex-named cgroups (such as a
# 32-digit session id) from being taken for containers.
_ID = r"[0-9a-f]{64}"

# (pattern for one path component, runtime). Order matters only for readability:
# the prefixes are disjoint.
_CONTAINER_COMPONENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^cri-containerd-({_ID})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_ID})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-({_ID})\.scope$"), "docker"),
    (re.compile(rf"^libpod-({_ID})(?:\.scope)?$"), "podman"),
    # cgroupfs driver: the bare ID. The runtime is not in the path; the pod's
    # containerStatuses (``containerd://…``) say which it is.
    (re.compile(rf"^({_ID})$"), "unknown"),
)

# CRI-O's per-container monitor process lives in its own scope next to the
# container; it is infrastructure, not the workload.
_CRIO_CONMON = re.compile(r"^crio-conmon-[0-9a-f]+(?:\.scope)?$")

# Pod component: ``pod<uid>`` (cgroupfs) or ``kubepods[-<qos>]-pod<uid>.slice``
# (systemd, with the UID's dashes turned into underscores because systemd
# reserves ``-`` as its slice hierarchy separator). Under a kubelet
# ``--cgroup-root`` (kind, some distributions) the slice gains a prefix:
# ``kubelet-kubepods-besteffort-pod<uid>.slice``. Static pods have a 32-digit
# hash for a UID, without dashes.
_POD_COMPONENT = re.compile(
    r"^(?:(?P<prefix>[a-z0-9_.-]*?)-)?pod(?P<uid>[0-9a-f][0-9a-f_-]{31,35})(?:\.slice)?$"
)
# cgroupfs driver: the QoS class is the parent directory of the pod directory.
_QOS_COMPONENT = re.compile(r"^(?:kubepods-)?(?P<qos>burstable|besteffort)(?:\.slice)?$")


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """The container a process runs in, as its cgroup path shows it."""

    container_id: str
    """64 hex digits, without a runtime prefix (the form pods report after ``containerd://``)."""
    runtime: str
    """``containerd``, ``cri-o``, ``docker``, ``podman`` or ``unknown`` (cgroupfs paths do not say)."""
    pod_uid: str | None
    """The pod UID with dashes, or None for a container outside Kubernetes."""
    qos: str | None
    """``guaranteed``, ``burstable`` or ``besteffort``; None outside Kubernetes or when the path hides it."""


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """The container named by one cgroup path, or None.

    Pure; never raises. The deepest component that names a container wins, so
    a container that creates sub-cgroups of its own still resolves.
    """
    components = [c for c in path.split("/") if c]
    container_at = -1
    container_id = runtime = ""
    for i, comp in enumerate(components):
        if _CRIO_CONMON.match(comp):
            return None
        for pattern, rt in _CONTAINER_COMPONENTS:
            m = pattern.match(comp)
            if m:
                container_at, container_id, runtime = i, m.group(1), rt
                break
    if container_at < 0:
        return None
    if runtime == "unknown" and container_at > 0 and components[container_at - 1] == "docker":
        runtime = "docker"  # Docker's own cgroupfs layout: /docker/<id>
    pod_uid: str | None = None
    qos: str | None = None
    # "kubepods" appears as kubepods, kubepods.slice, or under a --cgroup-root such as kubelet-kubepods.slice.
    # A path that climbs with ".." was read from inside a private cgroup namespace (the
    # agent's own pod, cgroupns=private being the default on cgroup v2): it is relative
    # to the agent's container, which sits under kubepods, so the kubepods prefix may be
    # among the components the ".." skipped.
    in_kubepods = ".." in components[:container_at] or any("kubepods" in c for c in components[:container_at])
    for i in range(container_at - 1, -1, -1):
        m = _POD_COMPONENT.match(components[i])
        if not m:
            continue
        if not in_kubepods:
            break  # a "pod…" directory outside the kubelet's tree is not a pod
        pod_uid = m.group("uid").replace("_", "-")
        prefix = m.group("prefix") or ""
        qos = next((q for q in ("burstable", "besteffort") if prefix.endswith(q)), None)
        if qos is None and i > 0:
            parent = _QOS_COMPONENT.match(components[i - 1])
            qos = parent.group("qos") if parent else None
        if qos is None and not prefix and i > 0 and components[i - 1] == "..":
            break  # cgroupfs path relative to a namespace: the QoS level was skipped, unknown
        # Guaranteed pods sit directly under kubepods, with no QoS level.
        qos = qos or "guaranteed"
        break
    return ContainerRef(container_id=container_id, runtime=runtime, pod_uid=pod_uid, qos=qos)


def parse_proc_cgroup(text: str) -> ContainerRef | None:
    """The container named by the contents of a ``/proc/<pid>/cgroup`` file, or None.

    Each line is ``hierarchy-id:controllers:path`` (v2: ``0::/path``). Pure; never raises.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ref = parse_cgroup_path(parts[2].strip())
        if ref is not None:
            return ref
    return None


def container_of(pid: int, proc: str = "/proc") -> ContainerRef | None:
    """The container process ``pid`` runs in, or None (not a container, gone, or unreadable).

    Never raises. Reads one small file.
    """
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    return parse_proc_cgroup(text)


def process_start_time(pid: int, proc: str = "/proc") -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot), or None.

    Together with the PID it names one process for the life of the machine, which
    makes it a cache key that PID reuse cannot fool. Never raises.
    """
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself contain spaces and ')'.
    close = raw.rfind(b")")
    if close < 0:
        return None
    fields = raw[close + 2 :].split()
    # fields[0] is field 3 (state), so field 22 is fields[19].
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class PidResolverConfig:
    """Bounds of :class:`PidResolver`."""

    max_entries: int = 8192
    """Most processes remembered (LRU); an eviction is counted as ``infersight.cache.evictions{cache=pid_container}``."""
    negative_ttl_s: float = 30.0
    """How long a "not in a container" answer is trusted; a runtime moves a new process into its cgroup shortly after fork."""
    start_recheck_s: float = 1.0
    """How long a process's start time is trusted before it is read again. The join asks once per
    request; a PID cannot be recycled within this time without the kernel wrapping its PID space."""


class PidResolver:
    """``container_of`` with a bounded LRU cache keyed by (pid, process start time).

    The start time is read at most every ``start_recheck_s`` per PID (one small
    file) so that a recycled PID never returns the previous process's container.

    Thread-safe: :meth:`resolve` may be called from any thread. Never raises.
    """

    def __init__(
        self,
        config: PidResolverConfig | None = None,
        *,
        proc: str = "/proc",
        metrics: SelfMetrics = SELF_METRICS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or PidResolverConfig()
        if self._config.max_entries < 1:
            raise ValueError("PidResolverConfig.max_entries must be at least 1")
        self._proc = proc
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        # (pid, start time) -> (ContainerRef or None, monotonic time of the lookup)
        self._cache: OrderedDict[tuple[int, int], tuple[ContainerRef | None, float]] = OrderedDict()
        self._last_hit: tuple[int, int] | None = None  # the cache's most recent key
        # pid -> (start time, or None for no such process, monotonic time it was read)
        self._starts: OrderedDict[int, tuple[int | None, float]] = OrderedDict()
        # the last answer given from the cache, (pid, answer, monotonic time it stays good until):
        # most records come from the process before, and this needs neither the lock nor a key
        self._memo: tuple[int, ContainerRef | None, float] | None = None
        metrics.describe(
            "infersight.cache.evictions", "counter", "Entries evicted from a bounded cache, by cache."
        )

    def resolve(self, pid: int) -> ContainerRef | None:
        """The container of ``pid`` now, or None (not a container, or the process is gone)."""
        now = self._clock()
        memo = self._memo
        if memo is not None and memo[0] == pid and now < memo[2]:
            return memo[1]  # what the cache answered, within the time it holds for
        config = self._config
        with self._lock:
            # the common case, in one lock: a process asked about within the recheck time
            seen = self._starts.get(pid)
            if seen is not None and now - seen[1] < config.start_recheck_s:
                known = seen[0]
                until = seen[1] + config.start_recheck_s
                if known is None:
                    self._memo = (pid, None, until)
                    return None
                hit, ref = self._cached((pid, known), now)
                if hit:
                    if ref is None:  # a negative answer holds for its own time too
                        until = min(until, self._cache[(pid, known)][1] + config.negative_ttl_s)
                    self._memo = (pid, ref, until)
                    return ref
        if seen is not None and now - seen[1] < config.start_recheck_s:
            start: int | None = seen[0]
        else:
            # a vanished process is remembered too (start None): its late records
            # do not each cost a failed open
            start = process_start_time(pid, self._proc)
            with self._lock:
                self._starts[pid] = (start, now)
                self._starts.move_to_end(pid)
                while len(self._starts) > config.max_entries:
                    self._starts.popitem(last=False)
                if start is not None:
                    hit, ref = self._cached((pid, start), now)
                    if hit:
                        return ref
        if start is None:
            return None
        key = (pid, start)
        ref = container_of(pid, self._proc)
        # The process may have exited and its PID been reused between the two reads.
        if process_start_time(pid, self._proc) != start:
            return None
        with self._lock:
            self._cache[key] = (ref, now)
            self._cache.move_to_end(key)
            self._last_hit = key
            while len(self._cache) > config.max_entries:
                self._cache.popitem(last=False)
                self._metrics.inc("infersight.cache.evictions", labels=(("cache", "pid_container"),))
        return ref

    def _cached(self, key: tuple[int, int], now: float) -> tuple[bool, ContainerRef | None]:
        """(True, the answer) when the cache holds a trusted answer for ``key``, made the most
        recent; (False, None) otherwise. Holds ``_lock``."""
        hit = self._cache.get(key)
        if hit is None or (hit[0] is None and now - hit[1] >= self._config.negative_ttl_s):
            return False, None
        if key != self._last_hit:  # already the most recent otherwise
            self._cache.move_to_end(key)
            self._last_hit = key
        return True, hit[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
