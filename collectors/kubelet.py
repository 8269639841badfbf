"""GPU → pod, from the kubelet's pod-resources gRPC API (v1).

The kubelet knows which device IDs its device plugins handed to which container.
:class:`GpuPodMap` asks it (``List`` and ``GetAllocatableResources`` over the
unix socket ``/var/lib/kubelet/pod-resources/kubelet.sock``, mounted read-only
from the host) every ``poll_interval_s`` on its own thread, keeps the NVIDIA
resources (``nvidia.com/gpu``, ``nvidia.com/gpu.shared``, ``nvidia.com/mig-*``),
and serves lookups from the last good snapshot without I/O. This is how
dcgm-exporter maps GPUs to pods; it needs no API-server access.

Device IDs are GPU UUIDs (``GPU-…``). Two forms need normalising:

* MIG devices. The NVIDIA device plugin reports the MIG UUID in whichever form
  the driver uses: ``MIG-<uuid>`` (R470+) or ``MIG-GPU-<gpu-uuid>/<gi>/<ci>``
  (R450/R460). The caller supplies the aliases NVML knows (any form → the UUID
  NVML reports for that MIG device); an ID not in them is kept as it is.
* Shared GPUs. With time-slicing the plugin advertises replicas named
  ``<uuid>::<n>``; the suffix is dropped, and a GPU then belongs to several pods.

When the socket is absent or the kubelet does not answer, the map is empty,
``available`` is False, ``infersight.collector.up{source="kubelet"}`` is 0 and
one line is logged per outage; the join then falls back to NVML's per-process
list mapped through cgroups. Nothing else in the agent is affected.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from collectors.podresources import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

UP = "infersight.collector.up"
UP_LABELS = (("source", "kubelet"),)
DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

PodContainer = tuple[str, str, str]
"""(namespace, pod name, container name)."""

MigAliases = Mapping[str, str] | Callable[[], Mapping[str, str]]


@dataclass(frozen=True)
class KubeletConfig:
    """Where the kubelet's pod-resources socket is and how often to ask it."""

    socket_path: str = DEFAULT_SOCKET
    """The pod-resources unix socket (a read-only hostPath mount in the DaemonSet)."""
    poll_interval_s: float = 10.0
    """Seconds between polls; a pod's GPUs are known at most this long after it starts."""
    rpc_timeout_s: float = 10.0
    """Deadline of each RPC."""
    resources: tuple[str, ...] = ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*")
    """Resource names kept (shell-style patterns); everything else the kubelet reports is ignored."""
    max_message_bytes: int = 16 << 20
    """Largest gRPC response accepted (gRPC's default of 4 MiB is small for a node with many pods)."""
    max_devices: int = 4096
    """Most (device, container) assignments kept per snapshot; more are dropped and counted."""

    def validate(self) -> None:
        """Raise ValueError for a setting that cannot work."""
        if self.poll_interval_s <= 0 or self.rpc_timeout_s <= 0:
            raise ValueError("KubeletConfig.poll_interval_s and rpc_timeout_s must be positive")
        if self.max_message_bytes < 1 or self.max_devices < 1:
            raise ValueError("KubeletConfig.max_message_bytes and max_devices must be at least 1")


def normalise_device_id(device_id: str, mig_aliases: Mapping[str, str]) -> str:
    """The GPU or MIG UUID a kubelet device ID stands for (see the module docstring). Pure."""
    base = device_id.split("::", 1)[0]
    return mig_aliases.get(base, base)


@dataclass(frozen=True)
class _Snapshot:
    by_device: Mapping[str, tuple[PodContainer, ...]] = field(default_factory=dict)
    by_pod: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    allocatable: tuple[str, ...] = ()


class GpuPodMap:
    """Which pod holds which GPU, refreshed from the kubelet on a background thread.

    Threading: :meth:`start`/:meth:`stop` from one owning thread; lookups from any
    thread (they read an immutable snapshot, swapped whole by the poller).
    :meth:`poll_once` may be called directly instead of :meth:`start` (not both
    at once). Nothing raises after construction; the constructor raises
    ValueError for a bad config.
    """

    def __init__(
        self,
        config: KubeletConfig | None = None,
        *,
        mig_aliases: MigAliases | None = None,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        self._config = config or KubeletConfig()
        self._config.validate()
        self._aliases = mig_aliases
        self._metrics = metrics
        self._snapshot = _Snapshot()
        self._available = False
        self._outage_logged = False
        self._allocatable_unsupported_logged = False
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.describe(UP, "gauge", "1 when the collector's source answers, by source.")
        metrics.describe("infersight.kubelet.errors", "counter", "Failed pod-resources polls, by reason.")
        metrics.describe(
            "infersight.kubelet.devices.dropped", "counter", "Device assignments dropped by max_devices."
        )

    # ---- lookups ----

    @property
    def available(self) -> bool:
        """Whether the latest poll got an answer from the kubelet."""
        return self._available

    def devices_of_pod(self, namespace: str, name: str) -> list[str]:
        """GPU / MIG UUIDs assigned to any container of the pod (empty when unknown)."""
        return list(self._snapshot.by_pod.get((namespace, name), ()))

    def pods_of_device(self, uuid: str) -> list[PodContainer]:
        """Every container the GPU (or MIG device) is assigned to; several when it is shared."""
        return list(self._snapshot.by_device.get(uuid, ()))

    def pod_of_device(self, uuid: str) -> PodContainer | None:
        """The one container holding the device, or None when none or several do (time-slicing)."""
        holders = self._snapshot.by_device.get(uuid, ())
        return holders[0] if len(holders) == 1 else None

    def allocatable_devices(self) -> list[str]:
        """Devices of the kept resources the kubelet can allocate (empty on kubelets without the RPC)."""
        return list(self._snapshot.allocatable)

    # ---- lifecycle ----

    def start(self) -> None:
        """Poll once in the background now and then every ``poll_interval_s``. Returns at once."""
        if self._thread is not None:
            return
        self._metrics.set(UP, 0, UP_LABELS)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="infersight-kubelet", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop polling; waits up to ``timeout`` for an RPC in flight (bounded by ``rpc_timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close_channel()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._config.poll_interval_s)

    # ---- polling ----

    def poll_once(self) -> bool:
        """Ask the kubelet once and swap in the new snapshot. Returns :attr:`available`. Never raises."""
        path = self._config.socket_path
        if not os.path.exists(path):
            self._degrade("socket_absent", f"no pod-resources socket at {path}")
            return False
        try:
            stub = self._get_stub()
            listed = stub.List(api_pb2.ListPodResourcesRequest(), timeout=self._config.rpc_timeout_s)
        except grpc.RpcError as e:
            if self._stop.is_set():
                return False  # stop() closed the channel under the RPC: not an outage
            self._close_channel()  # a restarted kubelet makes a new socket; reconnect from scratch
            self._degrade(_code_name(e), f"pod-resources List failed: {_code_name(e)}: {_details(e)}")
            return False
        except Exception as e:  # a malformed socket path, a closed channel: still only this feature
            self._close_channel()
            self._degrade("error", f"pod-resources List failed: {type(e).__name__}: {e}")
            return False
        aliases = self._current_aliases()
        allocatable = self._allocatable(stub, aliases)
        self._snapshot = self._build(listed, aliases, allocatable)
        if not self._available and self._outage_logged:
            log.info("kubelet: pod-resources answering again; GPU → pod mapping resumes")
        self._available = True
        self._outage_logged = False
        self._metrics.set(UP, 1, UP_LABELS)
        return True

    def _get_stub(self) -> Any:
        if self._stub is None:
            target = "unix://" + os.path.abspath(self._config.socket_path)
            # A channel of its own subchannels: from gRPC's process-wide pool, a new channel to the
            # same socket could take over the closed one's subchannel, still backing off from the
            # dead kubelet, and fail a poll that a restarted kubelet would answer.
            self._channel = grpc.insecure_channel(
                target, options=[("grpc.max_receive_message_length", self._config.max_message_bytes),
                                 ("grpc.use_local_subchannel_pool", 1)]
            )
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        return self._stub

    def _close_channel(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # already closed; nothing to free
                pass

    def _degrade(self, reason: str, message: str) -> None:
        self._metrics.inc("infersight.kubelet.errors", labels=(("reason", reason),))
        self._metrics.set(UP, 0, UP_LABELS)
        # A stale mapping could name the wrong pod once the GPU is reassigned; an
        # empty one makes the join fall back to NVML's process list instead.
        self._snapshot = _Snapshot()
        self._available = False
        if not self._outage_logged:
            log.warning("kubelet: %s; GPU metrics carry no pod labels from the kubelet until it answers", message)
            self._outage_logged = True

    def _current_aliases(self) -> Mapping[str, str]:
        source = self._aliases
        if source is None:
            return {}
        if not callable(source):
            return source
        try:
            return source()
        except Exception as e:  # NVML trouble: keep raw IDs rather than lose the mapping
            self._metrics.inc("infersight.kubelet.errors", labels=(("reason", "mig_aliases"),))
            log.debug("kubelet: MIG alias source failed: %s", e)
            return {}

    def _allocatable(self, stub: Any, aliases: Mapping[str, str]) -> tuple[str, ...]:
        try:
            resp = stub.GetAllocatableResources(
                api_pb2.AllocatableResourcesRequest(), timeout=self._config.rpc_timeout_s
            )
        except grpc.RpcError as e:
            # Kubelets before 1.23 (without the KubeletPodResourcesGetAllocatable gate)
            # answer UNIMPLEMENTED; List still works, so this is not an outage.
            self._metrics.inc("infersight.kubelet.errors", labels=(("reason", "allocatable_" + _code_name(e)),))
            if not self._allocatable_unsupported_logged:
                log.info("kubelet: GetAllocatableResources unavailable (%s); continuing with List", _code_name(e))
                self._allocatable_unsupported_logged = True
            return ()
        out: list[str] = []
        for dev in resp.devices:
            if self._kept(dev.resource_name):
                out.extend(normalise_device_id(d, aliases) for d in dev.device_ids)
        return tuple(dict.fromkeys(out))[: self._config.max_devices]

    def _kept(self, resource: str) -> bool:
        return any(fnmatch.fnmatchcase(resource, pattern) for pattern in self._config.resources)

    def _build(self, listed: Any, aliases: Mapping[str, str], allocatable: tuple[str, ...]) -> _Snapshot:
        by_device: dict[str, list[PodContainer]] = {}
        by_pod: dict[tuple[str, str], list[str]] = {}
        kept = dropped = 0
        for pod in listed.pod_resources:
            for container in pod.containers:
                holder = (pod.namespace, pod.name, container.name)
                for dev in container.devices:
                    if not self._kept(dev.resource_name):
                        continue
                    for raw in dev.device_ids:
                        if kept >= self._config.max_devices:
                            dropped += 1
                            continue
                        kept += 1
                        uuid = normalise_device_id(raw, aliases)
                        holders = by_device.setdefault(uuid, [])
                        if holder not in holders:
                            holders.append(holder)
                        devices = by_pod.setdefault((pod.namespace, pod.name), [])
                        if uuid not in devices:
                            devices.append(uuid)
        if dropped:
            self._metrics.inc("infersight.kubelet.devices.dropped", dropped)
        return _Snapshot(
            by_device={k: tuple(v) for k, v in by_device.items()},
            by_pod={k: tuple(v) for k, v in by_pod.items()},
            allocatable=allocatable,
        )


def _code_name(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name.lower() if code is not None else "unknown"


def _details(err: grpc.RpcError) -> str:
    return str(err.details()) if hasattr(err, "details") else str(err)


class StaticGpuPodMap:
    """An in-memory stand-in for :class:`GpuPodMap` with fixed assignments, for tests of the join.

    ``assignments``: device UUID → the containers holding it. Same lookups, same
    meaning (``pod_of_device`` is None for a shared device); never polls anything.
    """

    def __init__(self, assignments: Mapping[str, Sequence[PodContainer]] | None = None, available: bool = True) -> None:
        self._by_device = {uuid: tuple(holders) for uuid, holders in (assignments or {}).items()}
        self.available = available

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def devices_of_pod(self, namespace: str, name: str) -> list[str]:
        return [u for u, holders in self._by_device.items() if any(h[:2] == (namespace, name) for h in holders)]

    def pods_of_device(self, uuid: str) -> list[PodContainer]:
        return list(self._by_device.get(uuid, ()))

    def pod_of_device(self, uuid: str) -> PodContainer | None:
        holders = self._by_device.get(uuid, ())
        return holders[0] if len(holders) == 1 else None
